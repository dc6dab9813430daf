"""The composite options reach the product: Pipeline.replace, BackgroundReplacer.replace and `trt-bgswap run`.

On the tiny exported models (``exported_dir``) and a composite with a known soft alpha
(:mod:`trt_bgswap.benchmarking.mattes`), so the product's output can be compared with
``compose`` on the same inputs, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trt_bgswap.api import BackgroundReplacer, alpha_to_u8
from trt_bgswap.benchmarking.mattes import MatteCase, matte_cases
from trt_bgswap.cli import main
from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.compose import CompositeOptions, compose
from trt_bgswap.runtime.composite import composite, solid_background
from trt_bgswap.runtime.shadow import ShadowOptions

H, W = 150, 200
COLOUR = (0, 160, 255)


@pytest.fixture(scope="module")
def swapper(exported_dir: Path) -> BackgroundReplacer:
    return BackgroundReplacer(exported_dir, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def case() -> MatteCase:
    c = matte_cases(1, H, W, seed=3, kinds=("hair",))[0]
    # 8-bit alpha (as a mask file holds) so the CLI's PNG mask and the array are the same alpha
    return c


def test_api_replace_is_compose_with_the_options(swapper: BackgroundReplacer, case: MatteCase) -> None:
    solid = solid_background(COLOUR, W, H)
    out = swapper.replace(case.image, None, bg_color=COLOUR, mask=case.alpha)
    expected, _ = compose(case.image, solid, case.alpha, CompositeOptions())
    np.testing.assert_array_equal(out.image, expected)
    report = out.result.composite
    assert report is not None and report.decontaminated > 0 and report.refinement is None  # a given mask is not refined
    # the report carries the band's estimated colours (Foreground.image(photo) makes a cut-out without spill)
    spill_free = report.foreground.image(case.image)
    assert not np.array_equal(spill_free, case.image) and np.array_equal(out.cutout[..., :3], case.image)
    off = swapper.replace(case.image, None, bg_color=COLOUR, mask=case.alpha, composite_options=CompositeOptions(decontaminate=False))
    np.testing.assert_array_equal(off.image, composite(case.image, solid, case.alpha))
    shaded = swapper.replace(case.image, None, bg_color=COLOUR, mask=case.alpha, composite_options=CompositeOptions(shadow=ShadowOptions(opacity=1.0)))
    assert shaded.result.composite.shadow is not None and np.all(shaded.image <= out.image) and not np.array_equal(shaded.image, out.image)


def test_api_refines_only_the_maskers_alpha(swapper: BackgroundReplacer, case: MatteCase) -> None:
    side = swapper.pipeline.manifest.rmbg.input_size[0]
    big = np.asarray(Image.fromarray(case.image).resize((2 * side, round(1.5 * side)), Image.Resampling.LANCZOS))
    raw = swapper.mask(big)
    refined = swapper.source_alpha(big)
    plain = swapper.source_alpha(big, composite_options=CompositeOptions(refine_alpha=False))
    np.testing.assert_array_equal(plain, raw)
    out = swapper.replace(big, None, bg_color=COLOUR)
    info = out.result.composite.refinement
    assert info is not None and info.applied and info.upscale == pytest.approx(2.0)
    np.testing.assert_array_equal(out.alpha, refined)  # replace() refines exactly as source_alpha() does
    given = swapper.replace(big, None, bg_color=COLOUR, mask=raw)
    assert given.result.composite.refinement is None and np.array_equal(given.alpha, raw)


def test_api_generated_background_gets_seeded_grain(swapper: BackgroundReplacer, case: MatteCase) -> None:
    grain = CompositeOptions(grain=True, harmonize=0.5)
    a = swapper.replace(case.image, "a beach", seed=3, steps=2, mask=case.alpha, composite_options=grain)
    b = swapper.replace(case.image, "a beach", seed=3, steps=2, mask=case.alpha, composite_options=grain)
    plain = swapper.replace(case.image, "a beach", seed=3, steps=2, mask=case.alpha)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.result.composite.grain is not None and a.result.composite.harmonize is not None
    assert not np.array_equal(a.image, plain.image)


def test_api_refuses_bad_options_before_any_work(swapper: BackgroundReplacer, case: MatteCase) -> None:
    with pytest.raises(UsageError, match="--harmonize takes a strength between 0"):
        swapper.replace(case.image, None, bg_color=COLOUR, mask=case.alpha, composite_options=CompositeOptions(harmonize=2.0))


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_composite_flags(exported_dir: Path, case: MatteCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "photo.png"
    Image.fromarray(case.image).save(src)
    mask = tmp_path / "mask.png"
    Image.fromarray(alpha_to_u8(case.alpha)).save(mask)  # the case's alpha is 8-bit: the file holds it exactly
    solid = solid_background(COLOUR, W, H)
    common = ["-q", "run", "--models", exported_dir, "--provider", "cpu", src, "--bg-color", "#00a0ff", "--mask", mask]
    runs = {
        "default": ([], compose(case.image, solid, case.alpha)[0]),
        "naive": (["--no-decontaminate"], composite(case.image, solid, case.alpha)),
        "shadow": (["--shadow", "--shadow-offset", "0.02,0.05", "--shadow-blur", "0.05", "--shadow-opacity", "0.7"],
                   compose(case.image, solid, case.alpha, CompositeOptions(shadow=ShadowOptions((0.02, 0.05), 0.05, 0.7)))[0]),
        "harmonize+grain": (["--harmonize", "0.5", "--grain"], compose(case.image, solid, case.alpha, CompositeOptions(grain=True, harmonize=0.5))[0]),
    }
    for name, (flags, expected) in runs.items():
        out = tmp_path / f"{name}.png"
        code, err = _cli(capsys, *common, *flags, "-o", out)
        assert code == 0, err
        np.testing.assert_array_equal(np.asarray(Image.open(out)), expected, err_msg=name)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shadow-blur", "0.1"], "--shadow-blur shape the shadow: add --shadow, or drop them"),
        (["--shadow", "--shadow-opacity", "0"], "--shadow-opacity takes a value in (0, 1]"),
        (["--shadow", "--shadow-offset", "0.1"], "--shadow-offset '0.1': write two numbers DX,DY"),
        (["--shadow", "--shadow-offset", "a,b"], "write DX,DY as fractions of the subject's height"),
        (["--harmonize", "2"], "--harmonize=2.0: must be between 0.0 and 1.0"),
    ],
)
def test_cli_refuses_bad_composite_options(flags: list[str], message: str, exported_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src)
    code, err = _cli(capsys, "run", "--models", exported_dir, src, "--bg-color", "red", *flags, "-o", tmp_path / "out.png")
    assert code == 2 and message in err, err
    assert not (tmp_path / "out.png").exists()
