"""`anomalens` commands, run in-process through `cli.main` with the real winclip on test-tiny."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomalens
from anomalens.cli import main

# winclip on the random-weight test-tiny backbone at 64 px: a real method that runs in about a second.
WINCLIP = ["--method", "winclip", "--backbone", "test-tiny", "--pretrained", "none", "--set", "image_size=64"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """stderr without the random-init notice open_clip logs when a test-tiny model is built."""
    return [line for line in err.splitlines() if "No pretrained weights loaded" not in line]


def test_library_warnings_and_log_records_are_one_line(capsys, tmp_path, monkeypatch):
    import logging
    import warnings

    from anomalens.methods.base import Method

    predict = Method.predict

    def noisy_predict(self, *args, **kwargs):
        logging.getLogger("anomalens.test").warning("first line\nsecond line")
        warnings.warn("a library\nwarning", UserWarning, stacklevel=1)
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(Method, "predict", noisy_predict)
    image = write_png(tmp_path / "x.png")
    code, _, err = run(capsys, "detect", str(image), *WINCLIP, "--out", str(tmp_path), "--no-heatmaps")
    assert code == 0
    lines = err.splitlines()
    assert "anomalens: warning: first line second line" in lines
    assert any(line.startswith("anomalens: warning:") and "a library warning" in line for line in lines)
    # random weights asked for with --pretrained none are not worth a warning
    assert not [line for line in lines if "No pretrained weights loaded" in line]


def write_png(path: Path, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    code, out, err = run(capsys, "eval", "--method", "winclip")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "anomalens: error: the following arguments are required: --data (see 'anomalens eval --help')"
    ]
    code, _, err = run(capsys, "detect", "x.png", "--bogus")
    assert code == 2 and err.splitlines() == [
        "anomalens: error: unrecognized arguments: --bogus (see 'anomalens --help')"
    ]
    code, _, err = run(capsys, "detect", "x.png")  # neither --method nor --checkpoint
    assert code == 2 and err.splitlines() == ["anomalens: error: give --checkpoint or --method"]
    assert main([]) == 2


def test_key_value_flags_parse_into_a_dict(capsys):
    """--set/--train-set: JSON values (else the string), the last of a repeated key wins, each command
    line gets its own dict; a pair without '=' is a one-line usage error."""
    from anomalens.cli import build_parser

    parser = build_parser()
    argv = ["train", "--method", "m", "--data", "d", "--out", "o", "--set", "a=1", "--set", "b=x"]
    args = parser.parse_args([*argv, "--set", "a=[2]", "--train-set", "image.lr=1e-4"])
    assert args.options == {"a": [2], "b": "x"} and args.train_options == {"image.lr": 1e-4}
    assert parser.parse_args(argv[:7]).options == {}  # the default dict is not shared
    code, _, err = run(capsys, *argv[:7], "--set", "x")
    assert code == 2 and err.splitlines() == [
        "anomalens: error: --set expects KEY=VALUE, got 'x' (see 'anomalens train --help')"
    ]


def test_commands_that_run_models_retain_freed_memory(capsys, monkeypatch, mvtec_root):
    """Every command but `list` applies `anomalens.memory.retain_freed_memory` before it runs."""
    import anomalens.memory

    calls = []
    monkeypatch.setattr(anomalens.memory, "retain_freed_memory", lambda: calls.append(True))
    assert run(capsys, "list")[0] == 0 and calls == []
    assert run(capsys, "data", f"mvtec:{mvtec_root}", "--no-verify")[0] == 0 and calls == [True]


def test_runtime_errors_are_one_line_without_traceback(capsys, mvtec_root):
    code, out, err = run(capsys, "eval", "--method", "no-such-method", "--data", f"mvtec:{mvtec_root}")
    assert code == 1 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("anomalens: error: unknown method 'no-such-method'; available: ")
    assert "winclip" in line
    code, _, err = run(capsys, "eval", *WINCLIP, "--data", "mvtec:/no/such/dir")
    assert code == 1 and error_lines(err) == [
        "anomalens: error: dataset path not found: /no/such/dir (mvtec)"
    ]


def test_debug_adds_the_traceback(capsys):
    code, _, err = run(capsys, "eval", "--method", "winclip", "--data", "nonsense", "--debug")
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("anomalens: error: unknown dataset kind in 'nonsense'")


def test_convert_official_crane_checkpoint(capsys, tmp_path):
    import torch

    source = anomalens.create("crane", backbone="test-tiny", pretrained=None, device="cpu", image_size=64)
    with torch.no_grad():
        ctx = torch.randn_like(source.ctx_normal)
        source.ctx_normal.copy_(ctx)
    state = {
        "ctx_pos": source.ctx_normal.detach()[None, None].clone(),
        "ctx_neg": source.ctx_anomalous.detach()[None, None].clone(),
        "tokenized_prompts_pos": source.prompt_tokens[0].int().view(1, 1, -1),
        "tokenized_prompts_neg": source.prompt_tokens[1].int().view(1, 1, -1),
    }
    state.update(
        {f"compound_prompts_text.{i}": p.detach().clone() for i, p in enumerate(source.deep_prompts)}
    )
    torch.save({"prompt_learner": state}, tmp_path / "epoch_5.pth")
    out = tmp_path / "crane.anomalens"
    code, stdout, _ = run(
        capsys,
        "convert",
        "--from",
        "crane",
        str(tmp_path / "epoch_5.pth"),
        "--out",
        str(out),
        "--backbone",
        "test-tiny",
        "--pretrained",
        "none",
        "--set",
        "image_size=64",
        "--device",
        "cpu",
    )
    assert code == 0 and str(out) in stdout
    torch.testing.assert_close(anomalens.load(out, device="cpu").ctx_normal, ctx)

    code, _, err = run(capsys, "convert", "--from", "crane", str(tmp_path / "missing.pth"), "--out", str(out))
    assert code == 1
    (line,) = error_lines(err)
    assert "missing.pth" in line


def test_list_shows_methods_and_backbones(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in anomalens.methods.list_methods():
        assert f"\n  {name} " in out
    assert "test-tiny" in out


def test_detect_one_image_without_dataset_layout(capsys, tmp_path):
    image = write_png(tmp_path / "photo.png")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "detect", str(image), *WINCLIP, "--out", str(out_dir), "--threshold", "-1")
    assert code == 0, err
    rows = read_csv(out_dir / "scores.csv")
    assert rows[0] == ["path", "score", "verdict"]
    assert rows[1][0] == str(image) and rows[1][2] == "anomalous"  # every score is above -1
    assert np.isfinite(float(rows[1][1]))
    heatmap = Image.open(out_dir / "heatmaps" / "photo.png")
    assert heatmap.size == (48, 40) and heatmap.mode == "RGB"
    assert f"scored 1 image(s): {out_dir / 'scores.csv'}" in out


def test_detect_folder_skips_and_reports_unreadable_files(capsys, tmp_path):
    folder = tmp_path / "images"
    write_png(folder / "a.png", seed=1)
    write_png(folder / "nested" / "a.png", seed=2)  # same stem: its heatmap gets another name
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "detect", str(folder), *WINCLIP, "--out", str(out_dir))
    assert code == 1
    rows = read_csv(out_dir / "scores.csv")
    assert rows[0] == ["path", "score"]  # no threshold: no verdict column
    assert sorted(r[0] for r in rows[1:]) == [str(folder / "a.png"), str(folder / "nested" / "a.png")]
    assert sorted(p.name for p in (out_dir / "heatmaps").iterdir()) == ["a-2.png", "a.png"]
    lines = error_lines(err)
    assert len(lines) == 2 and "broken.png" in lines[0] and lines[0].startswith("anomalens: warning: ")
    assert lines[1] == "anomalens: error: 1 of 3 image(s) unreadable"
    assert "no verdicts" in out


def test_eval_writes_results_table_and_report(capsys, mvtec_root, tmp_path):
    out_dir = tmp_path / "eval"
    argv = ["eval", *WINCLIP, "--data", f"mvtec:{mvtec_root}", "--classes", "bottle", "--out", str(out_dir)]
    code, out, err = run(capsys, *argv, "--report", "--device", "cpu")
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    keys = {"method", "backbone", "pretrained", "protocol", "seed", "support_files", "datasets", "timing"}
    assert keys <= set(results)
    assert results["method"] == "winclip" and results["protocol"] == "zero-shot"
    assert results["timing"]["images"] == 4 and results["timing"]["device"] == "cpu"
    bottle = results["datasets"]["mvtec"]["classes"]["bottle"]
    assert {"image_auroc", "pixel_auroc", "aupro"} <= set(bottle)
    assert f"| mvtec | bottle | {100 * bottle['image_auroc']:.1f} |" in out
    assert (out_dir / "results.md").read_text() in out
    report = (out_dir / "report.html").read_text()
    assert "mvtec / bottle" in report and report.count("data:image/png;base64,") >= 4


def test_eval_fewshot_records_support_files(capsys, mvtec_root, tmp_path):
    out_dir = tmp_path / "eval"
    argv = ["eval", *WINCLIP, "--data", f"mvtec:{mvtec_root}", "--classes", "grid", "--out", str(out_dir)]
    code, _, err = run(capsys, *argv, "--shots", "2", "--support-seed", "7")
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    assert results["protocol"] == "fewshot" and results["seed"] == 7 and results["shots"] == 2
    paths = results["support_files"]["mvtec"]["grid"]
    assert len(paths) == 2 and all("/grid/train/good/" in p for p in paths)


def test_data_command_counts_and_verifies(capsys, mvtec_root):
    code, out, err = run(capsys, "data", f"mvtec:{mvtec_root}")
    assert code == 0, err
    assert "| train | bottle | 4 | 4 | 0 | 0 |" in out
    assert "| test | grid | 4 | 2 | 2 | 2 |" in out
    assert "| test | **all** | 8 | 4 | 4 | 4 |" in out
    assert "all 16 images (and their masks) decode" in out
    broken = mvtec_root / "grid" / "test" / "crack" / "001.png"
    broken.write_bytes(broken.read_bytes()[:40])
    code, out, err = run(capsys, "data", f"mvtec:{mvtec_root}")
    assert code == 1
    assert any(line.startswith("bad file: ") and str(broken) in line for line in out.splitlines())
    assert err.splitlines() == [
        f"anomalens: error: 1 file(s) of mvtec:{mvtec_root} cannot be read (listed above)"
    ]


def test_calibrate_stores_a_threshold_used_by_detect(capsys, mvtec_root, tmp_path):
    model = anomalens.methods.create("winclip", "test-tiny", None, device="cpu", image_size=64)
    checkpoint = model.save(tmp_path / "model.anomalens")
    normals = mvtec_root / "bottle" / "train" / "good"
    code, out, err = run(
        capsys, "calibrate", "--checkpoint", str(checkpoint), "--normals", str(normals), "--percentile", "100"
    )
    assert code == 0, err
    threshold = anomalens.methods.load(checkpoint, device="cpu").threshold
    assert threshold is not None and f"threshold {threshold:.6g} (percentile" in out
    code, _, err = run(
        capsys, "detect", str(normals), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "d")
    )
    assert code == 0, err
    rows = read_csv(tmp_path / "d" / "scores.csv")
    assert rows[0] == ["path", "score", "verdict"]
    assert [r[2] for r in rows[1:]] == ["normal"] * 4  # the 100th percentile flags none of them
    assert max(float(r[1]) for r in rows[1:]) == pytest.approx(threshold, rel=1e-5)
    code, _, err = run(capsys, "calibrate", "--checkpoint", str(checkpoint))
    assert code == 2 and err.splitlines() == [
        "anomalens: error: calibrate needs --data SPEC or --normals FILES (one of them)"
    ]


def test_bench_writes_json_and_markdown(capsys, tmp_path):
    argv = [
        "bench",
        "--methods",
        "winclip",
        "--backbone",
        "test-tiny",
        "--pretrained",
        "none",
        "--set",
        "image_size=64",
    ]
    argv += [
        "--batch-sizes",
        "1,2",
        "--image-size",
        "32",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--probe-size",
        "256",
        "--precision",
        "int8",
        "--out",
        str(tmp_path),
    ]
    code, out, err = run(capsys, *argv, "--device", "cpu")
    assert code == 0, err
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch_size"] for r in results["rows"]] == [1, 2] and results["options"] == {"image_size": 64}
    assert results["precision"] == "int8"
    for row in results["rows"]:
        assert row["method"] == "winclip" and row["images_per_s"] > 0
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p95"] and row["peak_memory_mb"] > 0
        assert row["gflop_per_image"] > 0 and row["matmul_gflops"] > 0
        assert row["matmul_ratio"] == pytest.approx(row["achieved_gflops"] / row["matmul_gflops"], rel=0.01)
    # FLOPs per image do not depend on the batch size (WinCLIP is batch-invariant).
    assert results["rows"][0]["gflop_per_image"] == pytest.approx(results["rows"][1]["gflop_per_image"])
    assert "| winclip | test-tiny | 2 |" in out and (tmp_path / "bench.md").read_text() in out


def test_train_writes_a_checkpoint_that_eval_loads(capsys, mvtec_root, tmp_path):
    out_dir = tmp_path / "run"
    argv = ["train", "--method", "april-gan", "--backbone", "test-tiny", "--pretrained", "none"]
    argv += [
        "--set",
        "image_size=32",
        "--data",
        f"mvtec:{mvtec_root}",
        "--classes",
        "bottle",
        "--out",
        str(out_dir),
    ]
    code, out, err = run(capsys, *argv, "--epochs", "1", "--batch-size", "4", "--train-set", "main.lr=0.01")
    assert code == 0, err
    checkpoint = out_dir / "model.anomalens"
    assert f"trained april-gan on mvtec (4 images): {checkpoint}" in out
    log = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    assert any(entry.get("lr") == pytest.approx(0.01) for entry in log)
    code, out, err = run(capsys, "eval", "--checkpoint", str(checkpoint), "--data", f"mvtec:{mvtec_root}")
    assert code == 0, err
    assert "april-gan · test-tiny (None) · zero-shot" in out
    code, _, err = run(capsys, "eval", "--checkpoint", str(checkpoint), "--set", "x=1", "--data", "mvtec:/x")
    assert code == 2 and err.splitlines() == [
        "anomalens: error: --set/--backbone apply to --method; a checkpoint stores its own"
    ]


def test_train_normal_only_drops_anomalous_images(capsys, mvtec_root, tmp_path):
    import anomalens.data as al_data

    test = al_data.load(f"mvtec:{mvtec_root}", "test", ["bottle"])
    n_normal = int((test.labels == 0).sum())
    assert 0 < n_normal < len(test)
    argv = ["train", "--method", "april-gan", "--backbone", "test-tiny", "--pretrained", "none"]
    argv += ["--set", "image_size=32", "--data", f"mvtec:{mvtec_root}", "--classes", "bottle"]
    code, out, err = run(capsys, *argv, "--normal-only", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert f"trained april-gan on mvtec ({n_normal} images)" in out


def test_train_shots_follow_the_method_and_amp_is_opt_in(capsys, mvtec_root, tmp_path):
    """AA-CLIP's 2-shot is one normal + one anomalous image per class (paper §4.1); fp32 unless --amp."""
    argv = ["train", "--method", "aa-clip", "--backbone", "test-tiny", "--pretrained", "none"]
    argv += ["--set", "image_size=64", "--data", f"mvtec:{mvtec_root}", "--classes", "bottle"]
    argv += ["--epochs", "1", "--stages", "image"]
    code, out, err = run(capsys, *argv, "--shots", "2", "--out", str(tmp_path / "fp32"))
    assert code == 0, err
    assert "trained aa-clip on mvtec (2 images)" in out
    start = json.loads((tmp_path / "fp32" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["configs"]["image"]["amp"] is False
    code, out, err = run(capsys, *argv, "--shots", "2", "--amp", "--out", str(tmp_path / "amp"))
    start = json.loads((tmp_path / "amp" / "train_log.jsonl").read_text().splitlines()[0])
    assert code == 0 and start["configs"]["image"]["amp"] is True
    code, _, err = run(capsys, *argv, "--shots", "3", "--out", str(tmp_path / "odd"))
    assert code != 0 and "even" in err and len(err.strip().splitlines()) == 1


def test_demo_trains_evaluates_and_reports_honestly(capsys, tmp_path, monkeypatch):
    """The demo trains on the method-training classes and evaluates on held-out ones, on anomalens-mini."""
    from anomalens import demo
    from anomalens.data.captions import class_names

    monkeypatch.setitem(demo.DEMO_SETTINGS, "aa-clip", ({}, {"epochs": 1, "batch_size": 8}))
    out_dir = tmp_path / "demo"
    argv = ["demo", "--method", "aa-clip", "--n", "2", "--classes", "star,plaid", "--out", str(out_dir)]
    code, out, err = run(capsys, *argv)
    trained = json.loads((out_dir / "results.json").read_text())
    untrained = json.loads((out_dir / "untrained" / "results.json").read_text())
    zero_shot = json.loads((out_dir / "winclip" / "results.json").read_text())
    assert trained["method"] == untrained["method"] == "aa-clip" and zero_shot["method"] == "winclip"
    assert trained["pretrained"] == untrained["pretrained"] == zero_shot["pretrained"] == "anomalens-mini"
    assert trained["timing"]["images"] == 8  # 2 held-out classes x (2 normal + 2 anomalous)
    assert set(trained["datasets"]["synthetic:transfer"]["classes"]) == {"star", "plaid"}
    assert (out_dir / "model.anomalens").is_file() and (out_dir / "train_log.jsonl").is_file()
    assert "| aa-clip trained | synthetic:transfer (held-out) |" in (out_dir / "results.md").read_text()
    assert (out_dir / "report.html").read_text().count("data:image/png;base64,") >= 4
    assert "TOY CLIP" in out and ", ".join(class_names("train")) in out
    assert "anomalens train --method aa-clip --data visa:/data/visa --pretrained openai" in out
    assert "anomalens eval --checkpoint runs/aa-clip/model.anomalens --data mvtec:/data/mvtec" in out
    image_auroc = trained["datasets"]["synthetic:transfer"]["mean"]["image_auroc"]
    for label, results in (
        ("winclip zero-shot", zero_shot),
        ("aa-clip untrained", untrained),
        ("aa-clip trained", trained),
    ):
        mean = results["datasets"]["synthetic:transfer"]["mean"]
        cells = f"{100 * mean['image_auroc']:.1f} | {100 * mean['pixel_auroc']:.1f}"
        assert f"| {label} | synthetic:transfer (held-out) | {cells} |" in out
    # The exit code is the honest check: non-zero unless the trained model beats chance.
    assert code == (0 if image_auroc > 0.5 else 1), err


def test_demo_rejects_a_class_that_is_not_held_out(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--classes", "star,gear", "--out", str(tmp_path / "demo"))
    assert code == 1 and "--classes: gear" in err and "honeycomb" in err
    assert not (tmp_path / "demo").exists()


def test_eval_generalist_protocol(capsys, mvtec_root, tmp_path):
    out_dir = tmp_path / "eval"
    argv = ["eval", *WINCLIP, "--data", f"mvtec:{mvtec_root}", "--classes", "grid", "--out", str(out_dir)]
    code, out, err = run(
        capsys, *argv, "--protocol", "generalist", "--shots", "1,2", "--seeds", "2", "--report"
    )
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    assert results["protocol"] == "generalist" and results["shots"] == [1, 2] and results["seeds"] == [0, 1]
    assert set(results["datasets"]) == {"mvtec/1-shot", "mvtec/2-shot"}
    assert set(results["support_files"]["mvtec/2-shot"]) == {"0", "1"}
    assert "| mvtec/2-shot | std |" in out
    assert "K=1, seed 0" in (out_dir / "report.html").read_text()
    code, _, err = run(capsys, *argv, "--protocol", "zero-shot", "--shots", "2")
    assert code == 1 and error_lines(err) == [
        "anomalens: error: the zero-shot protocol takes no --shots/--seeds"
    ]
