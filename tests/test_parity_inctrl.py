"""Parity with the official InCTRL code (mala-lab/InCTRL), run only where its source tree is at
``$ANOMALENS_OFFICIAL/InCTRL`` (never copied into this repository).

The official model is built with random weights in a subprocess (its tree ships a package named
``open_clip`` that would shadow the installed one), with its BatchNorm statistics randomised so that a
wrong head mapping shows. Its state dict is then converted with `anomalens.converters.inctrl.convert`
(CLIP weights passed as a local open_clip checkpoint) and both models score the same tensors:

* default options, any batch: equal to the official model run one image at a time (its correct mode);
* ``official_compat=True``, a batch of two: equal to the official batched forward, regrouping included;
* training under ``official_compat=True`` (batch-norm heads in train mode, per-query supports through the
  official regrouping, focal loss with the second sigmoid): the loss and the gradients of one step equal
  the official `train_epoch` step (engine_IC.py:53-73).
"""

from __future__ import annotations

import pytest
import torch

import official_code

pytestmark = pytest.mark.skipif(
    not official_code.available("inctrl"), reason="official InCTRL tree not at $ANOMALENS_OFFICIAL/InCTRL"
)

CLASS_NAME = "metal_nut"
# The body of the script run in the official tree (after `official_code.INCTRL_PREAMBLE`).
RUNNER = """

    with open(f"{repo}/open_clip/model_configs/ViT-B-16-plus-240.json") as f:
        cfg = json.load(f)
    torch.manual_seed(0)
    model = InCTRL(None, cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], False, cast_dtype=None).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in (model.diff_head, model.diff_head_ref):
            for bn in (head.bn2, head.bn3):
                bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=gen))
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
                bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=gen))
    inctrl_memoise_text(model)

    data = torch.load(inp)
    images, support, name = data["images"], data["support"], data["class_name"]
    tokenizer = open_clip.get_tokenizer("ViT-B-16-plus-240")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    b = images.shape[0]
    shared = [s[None].expand(b, -1, -1, -1) for s in support]
    with torch.no_grad():
        final, s_i = model(tokenizer, [images, *shared], [name] * b, None)
        one = [s[:1] for s in shared]
        singles = [model(tokenizer, [images[i : i + 1], *one], [name], None) for i in range(b)]
    # Official training step (engine_IC.py:53-73): train mode, BinaryFocalLoss(logits=True) on the final
    # score and on s_i, gradients of the adapter and heads (the only parameters that require grad).
    from binary_focal_loss import BinaryFocalLoss

    model.train()
    labels = data["labels"]
    shots = list(data["train_support"])  # K tensors (B, 3, S, S): shot k of every query
    train_final, train_s_i = model(tokenizer, [images, *shots], [name] * b, None)
    loss = BinaryFocalLoss()(train_final, labels) + BinaryFocalLoss()(train_s_i, labels)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    torch.save(
        {
            "train_loss": loss.detach(),
            "train_grads": grads,
            "state": initial,
            "final_batch": final,
            "s_i_batch": s_i,
            "final_single": torch.cat([f for f, _ in singles]),
            "s_i_single": torch.cat([s for _, s in singles]),
        },
        out,
    )
"""


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("inctrl_parity")
    torch.manual_seed(0)
    inputs = {
        # Four queries: train-mode BatchNorm over a batch of two normalises each feature to about ±1, so
        # its gradients amplify rounding differences of the features by orders of magnitude.
        "images": torch.randn(4, 3, 240, 240),
        "support": torch.randn(2, 3, 240, 240),
        "class_name": CLASS_NAME,
        "labels": torch.tensor([0.0, 1.0, 0.0, 1.0]),
        "train_support": torch.randn(2, 4, 3, 240, 240),  # (K shots, B queries, 3, S, S)
    }
    out = official_code.run_inctrl(RUNNER, inputs, tmp, timeout=1800)
    official_code.save_inctrl_checkpoint(out["state"], tmp, "checkpoint_1.pyth")
    return {**out, **inputs, "dir": tmp}


def _scores(official: dict, compat: bool) -> tuple[dict, list[dict]]:
    from anomalens.converters.inctrl import convert

    tmp = official["dir"]
    model = convert(
        tmp / "checkpoint_1.pyth", pretrained=str(tmp / "clip.pt"), device="cpu", official_compat=compat
    )
    ctx = model.prepare_support(official["support"])
    images, names = official["images"], [CLASS_NAME] * len(official["images"])
    with torch.no_grad():
        batch = model.components(images, names, ctx)
        singles = [model.components(images[i : i + 1], names[:1], ctx) for i in range(len(images))]
    return batch, singles


def test_default_matches_the_official_model_one_image_at_a_time(official):
    batch, singles = _scores(official, compat=False)
    torch.testing.assert_close(batch.final, official["final_single"], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.s_i, official["s_i_single"], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        torch.cat([s.final for s in singles]), official["final_single"], atol=1e-4, rtol=0
    )


def test_official_compat_matches_the_official_batched_forward(official):
    batch, singles = _scores(official, compat=True)
    torch.testing.assert_close(batch.final, official["final_batch"], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.s_i, official["s_i_batch"], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        torch.cat([s.final for s in singles]), official["final_single"], atol=1e-4, rtol=0
    )
    assert (official["final_batch"] - official["final_single"]).abs().max() > 1e-4  # the regrouping shows


def test_official_compat_training_step_matches_the_official_train_epoch(official):
    """Loss and gradients of one training step (train-mode batch norm, per-query supports) at 1e-4."""
    from anomalens.converters.inctrl import convert, map_official_state
    from anomalens.methods.base import TrainBatch

    tmp = official["dir"]
    model = convert(
        tmp / "checkpoint_1.pyth", pretrained=str(tmp / "clip.pt"), device="cpu", official_compat=True
    )
    stage = model.training_stages()[0]
    images = official["images"]
    b = images.shape[0]
    batch = TrainBatch(
        images=images,
        masks=torch.zeros(b, 240, 240),
        labels=official["labels"].long(),
        has_mask=torch.ones(b, dtype=torch.bool),
        class_names=[CLASS_NAME] * b,
        support=official["train_support"].transpose(0, 1),  # (B, K, 3, S, S)
    )
    model.train()
    loss = stage.loss(batch)["loss"]
    loss.backward()
    torch.testing.assert_close(loss.detach(), official["train_loss"], atol=1e-4, rtol=0)
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = map_official_state(official["train_grads"], negate_residual=False)
    assert set(ours) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-4, rtol=1e-4, msg=name)
