"""How well `trt-bgswap dataset`'s background masks agree with the true background (IoU), per masker and band.

The photos are composites with a known alpha (tests/composites.py: the horse silhouette of
scikit-image, filled with chelsea's fur, on astronaut / coffee / rocket, 720x528). Maskers: the
photo's own alpha (RGBA input: the true alpha), and RMBG from an exported folder (here the tiny
random-weight RMBG unless --rmbg names a real export). IoU is against the true background
(alpha == 0); the band removes a ring of the background around the subject by design.

    python benchmarks/dataset_masks.py --work /tmp/ds-iou [--rmbg EXPORTED_DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from composites import BACKGROUNDS, iou, make_composite  # noqa: E402

SIZE = (720, 528)
OFFSETS = ((0.2, 0.15), (0.35, 0.2), (0.05, 0.1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--rmbg", help="an exported folder with an RMBG model (default: export the tiny random-weight one)")
    args = p.parse_args()
    from trt_bgswap.cli import main as cli

    work = Path(args.work)
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name, offset in zip(BACKGROUNDS, OFFSETS):
        c = make_composite(name, SIZE, offset)
        a8 = np.rint(c.alpha * 255).astype(np.uint8)
        Image.fromarray(np.dstack([c.rgb, a8]), "RGBA").save(photos / f"{name}.png")
        truth[name] = a8.astype(np.float32) / 255.0
    rmbg = args.rmbg
    if rmbg is None:
        from trt_bgswap.export.tiny import write_tiny_models

        rmbg = str(work / "tiny-export")
        if not Path(rmbg, "manifest.json").exists():
            write_tiny_models(work / "tiny", seed=0)
            assert cli(["-q", "export", "--inpaint", "none", "--lcm-lora", "none", "--rmbg", str(work / "tiny" / "rmbg"), "--out", rmbg]) == 0
    rows = []
    for masker, extra in (("photo alpha (true)", []), (f"rmbg {rmbg}", ["--ignore-alpha", "--rmbg", rmbg])):
        for band in (0, 4, 8):
            out = work / f"ds-{len(rows)}"
            assert cli(["-q", "dataset", str(photos), "-o", str(out), "--band", str(band), "--max-side", "0", "--format", "png",
                        "--min-background", "0", "--max-background", "1", "--max-pieces", "100000", *extra]) == 0
            values = {}
            for meta in out.glob("*/metadata.jsonl"):
                for line in meta.read_text().splitlines():
                    row = json.loads(line)
                    mask = np.asarray(Image.open(meta.parent / row["mask_file_name"])) >= 128
                    alpha = truth[Path(row["file_name"]).stem]
                    values[Path(row["file_name"]).stem] = (iou(mask, alpha == 0), int((mask & (alpha > 0)).sum()))
            rows.append({"masker": masker, "band": band, "iou": {k: round(v[0], 4) for k, v in sorted(values.items())},
                         "subject_pixels_in_mask": {k: v[1] for k, v in sorted(values.items())}})
            print(json.dumps(rows[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
