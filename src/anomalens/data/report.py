"""`anomalens data`: a spec's image counts per split and class, and a check that every file decodes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from anomalens import data as al_data


@dataclass
class SpecReport:
    """A markdown table of counts (split × class), the number of images, and the files that fail."""

    table: str
    images: int
    verified: bool
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """What `anomalens data` prints: the table, then the files that fail to decode (or that all do)."""
        if not self.verified:
            return f"{self.table}\n(images not decoded: --no-verify)"
        if self.problems:
            return "\n".join([self.table, *(f"bad file: {problem}" for problem in self.problems)])
        return f"{self.table}\nall {self.images} images (and their masks) decode"


def describe_spec(
    spec: str,
    split: str = "all",
    classes: Sequence[str] | None = None,
    verify: bool = True,
    progress: bool = True,
) -> SpecReport:
    """Count the images of `spec` per split ("train", "test" or "all" = both) and class and, with
    `verify`, decode every image and mask. A split without images is a row of zeros; a spec without any
    image is a `DataError`."""
    from tqdm.auto import tqdm

    splits = ("train", "test") if split == "all" else (split,)
    lines = [
        spec,
        "| split | class | images | normal | anomalous | with mask |",
        "|---|---|---:|---:|---:|---:|",
    ]
    report = SpecReport("", 0, verify)
    for name in splits:
        try:
            dataset = al_data.load(spec, name, classes)
        except al_data.DataError as error:
            if "no images in split" not in str(error):
                raise
            lines.append(f"| {name} | (none) | 0 | 0 | 0 | 0 |")
            continue
        report.images += len(dataset)
        info = al_data.describe(dataset)
        for cls, c in [*info["classes"].items(), ("**all**", info)]:
            lines.append(
                f"| {name} | {cls} | {c['images']} | {c['normal']} | {c['anomalous']} | {c['with_mask']} |"
            )
        if verify:
            chunk = 64
            for start in tqdm(
                range(0, len(dataset), chunk), desc=f"verify {name}", disable=not progress, leave=False
            ):
                report.problems += al_data.verify(
                    dataset.subset(range(start, min(start + chunk, len(dataset))))
                )
    if not report.images:
        raise al_data.DataError(f"no images in {spec}")
    report.table = "\n".join(lines)
    return report
