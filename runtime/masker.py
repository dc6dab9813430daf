"""Subject masks with RMBG-1.4, BiRefNet or RMBG-2.0: each model's reference pre/post-processing around an engine, numpy only.

Which masker a graph is comes from its repo's configs (``config.json``: BiRefNet's and RMBG-2.0's
declare the BiRefNet architecture; ``preprocessor_config.json``: size, mean, std), or from
``--masker NAME`` where the file cannot tell (RMBG-2.0 is BiRefNet's architecture under another
licence); the registry holds each variant's defaults and post-processing. BiRefNet / RMBG-2.0
(Zheng et al. 2024, "Bilateral Reference for High-Resolution Dichotomous Image Segmentation";
the model cards' reference)::

    x = normalize(resize(image, (1024, 1024)) / 255, ImageNet mean, ImageNet std)
    alpha = resize(net(x)[-1].sigmoid(), (h, w))

with the sigmoid skipped where the graph already ends in one (:func:`output_is_sigmoid`).
RMBG-1.4 (below) min-max normalises instead.

Reference (``utilities.py`` and the model card of briaai/RMBG-1.4)::

    x = F.interpolate(rgb_chw[None].float(), size=model_input_size, mode="bilinear")
    x = normalize(x / 255.0, mean, std)                          # mean 0.5, std 1.0
    y = F.interpolate(net(x)[0][0], size=(h, w), mode="bilinear")  # sigmoid(d1), the main mask
    alpha = (y - y.min()) / (y.max() - y.min())

:class:`Masker` does exactly that with :mod:`trt_bgswap.runtime.resize` (torch-exact
bilinear) and returns the float alpha (the reference then quantises to uint8; callers that
want that can). Where the reference divides by zero (a constant prediction) the constant,
clipped to [0, 1], is returned instead of NaNs.

Published RMBG ONNX files may carry IS-Net's side outputs next to the mask. The **main
output rule** (shared with :mod:`trt_bgswap.export.rmbg`): candidates are rank-4 outputs
whose channel dim is 1 (or left symbolic by the exporter) and whose spatial dims do not
contradict the input's; the one named ``output`` wins (the name BRIA's and transformers.js'
exports give ``sigmoid(d1)``), else the first candidate in graph order (``torch.onnx.export``
flattens ``forward``'s return in order, and IS-Net returns ``sigmoid(d1)`` first).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trt_bgswap.errors import InputImageError, ModelError, UsageError
from trt_bgswap.manifest import Manifest, RmbgConfig
from trt_bgswap.registry import DEFAULTS, Variant, get_variant, variants_of
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.resize import resize_bilinear
from trt_bgswap.onnx_graph import GraphDim
from trt_bgswap.specs import RMBG, RMBG_FULL, ModelSpec, RmbgFullIO, TensorSpec, rmbg_spec

log = logging.getLogger(__name__)

MAIN_OUTPUT_NAME = "output"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MODEL_CONFIG = "config.json"
BIREFNET, BIREFNET_TYPE, BIREFNET_CLASS = "birefnet", "birefnet", "BiRefNet"  # registry variant; config model_type / architectures
MINMAX, SIGMOID, CLIP = "minmax", "sigmoid", "clip"  # RmbgConfig.postprocess kinds
PASS_THROUGH_OPS = ("Cast", "Identity")
PIXEL_SCALE = 255.0  # the reference divides by 255.0; a preprocessor asking for another rescale factor is refused
RESCALE = 1.0 / PIXEL_SCALE




def find_main_output(input_shape: Sequence[GraphDim], outputs: Sequence[tuple[str, Sequence[GraphDim]]]) -> str:
    """Name of the final sigmoid mask among a graph's float outputs (the module docstring's rule)."""

    def fits(shape: Sequence[GraphDim]) -> bool:
        if len(shape) != 4 or isinstance(shape[1], int) and shape[1] != 1:
            return False
        for want, got in zip(input_shape[2:], shape[2:]):
            if isinstance(want, int) and isinstance(got, int) and want != got:
                return False
        return True

    candidates = [name for name, shape in outputs if fits(shape)]
    if not candidates:
        raise ModelError(
            f"no output of shape (B, 1, H, W) among {[(n, list(s)) for n, s in outputs]}; "
            "this is not an RMBG/IS-Net mask graph"
        )
    return MAIN_OUTPUT_NAME if MAIN_OUTPUT_NAME in candidates else candidates[0]


def static_input_size(path: Path, input_shape: Sequence[GraphDim]) -> int | None:
    """The square input side a graph fixes, or None when it leaves H/W dynamic."""
    if len(input_shape) != 4:
        raise ModelError(f"{path}: input has shape {list(input_shape)}; RMBG takes (batch, 3, height, width)")
    if input_shape[1] != 3:
        raise ModelError(f"{path}: input has {input_shape[1]} channels; RMBG takes 3 (RGB). Give an RMBG-1.4 model")
    h, w = input_shape[2], input_shape[3]
    if isinstance(h, int) and isinstance(w, int):
        if h != w:
            raise ModelError(f"{path}: input is {h}x{w}; only square RMBG inputs are supported")
        return h
    return None


def spec_for_graph(input_name: str, output_name: str, input_shape: Sequence[GraphDim], input_size: int | None) -> ModelSpec:
    """``rmbg_spec`` for a graph's names; a batch the graph fixes (e.g. 1) stays fixed."""
    spec = rmbg_spec(input_size, input_name=input_name, output_name=output_name)
    batch = input_shape[0] if input_shape else None
    if not isinstance(batch, int):
        return spec

    def fix(t: TensorSpec) -> TensorSpec:
        return replace(t, shape=(batch, *t.shape[1:]))

    return replace(spec, inputs=tuple(fix(t) for t in spec.inputs), outputs=tuple(fix(t) for t in spec.outputs))


def find_preprocessor_config(model_path: Path) -> Path | None:
    """``preprocessor_config.json`` beside an ONNX file or one folder up (the hub layout keeps ONNX in ``onnx/``)."""
    for folder in (model_path.parent, model_path.parent.parent):
        candidate = folder / PREPROCESSOR_CONFIG
        if candidate.is_file():
            return candidate
    return None


def read_preprocessor_config(path: Path) -> tuple[tuple[int, int], tuple[float, float, float], tuple[float, float, float]]:
    """(input size (h, w), mean, std) from an RMBG ``preprocessor_config.json``."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        size = d["size"]
        hw = (int(size["height"]), int(size["width"])) if isinstance(size, dict) else (int(size), int(size))
        if d.get("do_normalize", True):
            mean = tuple(float(v) for v in d["image_mean"])
            std = tuple(float(v) for v in d["image_std"])
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = float(d.get("rescale_factor", RESCALE)) if d.get("do_rescale", True) else 1.0
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: unreadable RMBG preprocessor config ({e!r}); restore the file from the model repo") from e
    if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
        raise ModelError(f"{path}: image_mean={list(mean)} image_std={list(std)}; need three values each, std non-zero")
    if abs(rescale - RESCALE) > 1e-9:
        raise ModelError(f"{path}: rescale_factor={rescale}; RMBG's reference divides pixels by 255 (1/255), fix the config")
    return hw, mean, std  # type: ignore[return-value]


def find_model_config(model_path: Path) -> Path | None:
    """``config.json`` beside an ONNX file or one folder up (the hub layout keeps ONNX in ``onnx/``)."""
    for folder in (model_path.parent, model_path.parent.parent):
        if (folder / MODEL_CONFIG).is_file():
            return folder / MODEL_CONFIG
    return None


def is_birefnet_config(config: Path | None) -> bool:
    """Whether a repo's ``config.json`` declares the BiRefNet architecture (BiRefNet's and RMBG-2.0's do; RMBG-1.4's says BriaRMBG)."""
    if config is None:
        return False
    try:
        d = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{config}: unreadable model config ({e}); restore the file from the model repo") from e
    return str(d.get("model_type", "")).lower() == BIREFNET_TYPE or any(BIREFNET_CLASS in str(a) for a in d.get("architectures") or ())


def masker_variant(model_path: Path, name: str | None = None) -> Variant:
    """Which masker's pre/post-processing applies: ``name`` (``--masker``) when given, else the repo's ``config.json``.

    A BiRefNet-architecture config is BiRefNet (MIT) unless ``--masker rmbg-2.0`` says it is BRIA's
    RMBG-2.0 (the same architecture and processing, another licence: the file cannot tell them apart).
    Anything else is RMBG-1.4, as before issue 12.
    """
    if name is not None:
        v = get_variant(name)
        if v.family != "rmbg":
            raise UsageError(f"--masker {name}: not a masker; choose one of {', '.join(m.name for m in variants_of('rmbg'))}")
        return v
    return get_variant(BIREFNET if is_birefnet_config(find_model_config(model_path)) else DEFAULTS["rmbg"])


def output_is_sigmoid(path: Path, output_name: str) -> bool | None:
    """Whether the graph computes ``output_name`` with a Sigmoid (through Cast/Identity nodes); None without the onnx package.

    BiRefNet's reference applies the sigmoid after the net; an export that folded it into the graph
    must not get a second one.
    """
    try:
        import onnx
    except ImportError:
        return None
    producers = {o: n for n in onnx.load(str(path), load_external_data=False).graph.node for o in n.output}
    node = producers.get(output_name)
    while node is not None and node.op_type in PASS_THROUGH_OPS:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "Sigmoid"


def postprocess_kind(variant: Variant, sigmoid_in_graph: bool | None) -> str:
    """The variant's post-processing, with a sigmoid already in the graph turned into a clip (probabilities in, not logits)."""
    if variant.postprocess == SIGMOID and sigmoid_in_graph:
        return CLIP
    return variant.postprocess


def rmbg_config_for(
    model_path: Path,
    input_name: str,
    output_name: str,
    graph_size: int | None,
    preprocessor: Path | None,
    masker: str | None = None,
) -> RmbgConfig:
    """RmbgConfig from the preprocessor config when there is one, else the masker variant's registry defaults.

    The variant (:func:`masker_variant`) decides the post-processing and the licence; a size the
    graph fixes wins over the config's (with a warning if they disagree).
    """
    variant = masker_variant(model_path, masker)
    if preprocessor is not None:
        size, mean, std = read_preprocessor_config(preprocessor)
        source = str(preprocessor)
    else:
        v = variant
        assert v.input_size is not None and v.mean is not None and v.std is not None
        size, mean, std = v.input_size, v.mean, v.std
        source = f"registry defaults of {v.name}"
    if graph_size is not None and size != (graph_size, graph_size):
        if preprocessor is not None:  # an explicit config that disagrees with its graph is worth a warning
            log.warning("%s: graph input is %dx%d but %s says %s; using the graph's", model_path, graph_size, graph_size, source, size)
        size = (graph_size, graph_size)
    if size[0] != size[1]:
        raise ModelError(f"{source}: size {size[1]}x{size[0]} is not square; RMBG graphs take square inputs")
    post = postprocess_kind(variant, output_is_sigmoid(model_path, output_name) if variant.postprocess == SIGMOID else False)
    log.info("%s: masker %s, preprocessing from %s (size %s, mean %s, std %s), post-processing %s", model_path, variant.name, source, size, mean, std, post)
    return RmbgConfig(input_size=size, mean=mean, std=std, input_name=input_name, output_name=output_name, masker=variant.name, postprocess=post)


def _graph_io(path: Path) -> tuple[str, list[GraphDim], list[tuple[str, list[GraphDim]]]]:
    """Input name/shape and float outputs of an ONNX file, read with ONNX Runtime (no onnx package)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises untyped errors for corrupt files
        raise ModelError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]}); give an RMBG .onnx file") from e
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{path}: {len(inputs)} inputs {[i.name for i in inputs]}; an RMBG graph has one image input")
    outputs = [(o.name, list(o.shape)) for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(float16)")]
    return inputs[0].name, list(inputs[0].shape), outputs


class Masker:
    """RMBG-1.4 alpha mattes for uint8 RGB images, run by any :class:`Engine`."""

    def __init__(self, engine: Engine, cfg: RmbgConfig) -> None:
        if cfg.input_name not in engine.spec.input_names or cfg.output_name not in engine.spec.output_names:
            raise ModelError(
                f"{engine.path}: RMBG config names input {cfg.input_name!r} / output {cfg.output_name!r} but the "
                f"engine has {engine.spec.input_names} / {engine.spec.output_names}; re-run `trt-bgswap export`"
            )
        if cfg.postprocess not in POSTPROCESS:
            raise ModelError(f"{engine.path}: masker post-processing {cfg.postprocess!r} is unknown (this trt-bgswap knows {sorted(POSTPROCESS)}); re-run `trt-bgswap export`")
        self.engine = engine
        self.cfg = cfg
        self._mean = np.asarray(cfg.mean, np.float32).reshape(3, 1, 1)
        self._std = np.asarray(cfg.std, np.float32).reshape(3, 1, 1)
        batch = engine.spec.tensor(cfg.input_name).shape[0]
        self._max_batch = batch if isinstance(batch, int) else None  # None: any batch in one call

    # --- construction ---

    @classmethod
    def from_onnx(cls, path: str | Path, provider: str = "auto", intra_op_threads: int = 0, masker: str | None = None) -> "Masker":
        """A raw masker ONNX file (published or exported); side outputs are left uncomputed by name; ``masker`` as ``--masker``."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such ONNX file; give the path of an RMBG .onnx model")
        input_name, input_shape, outputs = _graph_io(path)
        size = static_input_size(path, input_shape)
        output_name = find_main_output(input_shape, outputs)
        cfg = rmbg_config_for(path, input_name, output_name, size, find_preprocessor_config(path), masker)
        spec = spec_for_graph(input_name, output_name, input_shape, size)
        engine = OrtEngine(spec, path, provider=provider, intra_op_threads=intra_op_threads)
        engine.load()
        log.info("%s: RMBG input %r %s, main output %r", path, input_name, cfg.input_size, output_name)
        return cls(engine, cfg)

    @classmethod
    def from_export(
        cls,
        folder: str | Path,
        manifest: Manifest,
        provider: str = "auto",
        intra_op_threads: int = 0,
    ) -> "Masker":
        """The ``rmbg`` model of an exported folder, with the constants its manifest recorded."""
        folder = Path(folder)
        if manifest.rmbg is None or RMBG not in manifest.models:
            raise ModelError(f"{folder}: the export has no RMBG model; re-run `trt-bgswap export` with --rmbg")
        entry = manifest.models[RMBG]
        engine = OrtEngine(entry.spec, folder / entry.file, provider=provider, intra_op_threads=intra_op_threads)
        engine.load()
        return cls(engine, manifest.rmbg)

    # --- the reference steps (public so benchmarks can time them) ---

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 -> float32 3xSxS: torch-bilinear resize of 0..255 values, then x/255, mean, std."""
        _check_rgb(rgb)
        x = resize_bilinear(rgb.transpose(2, 0, 1), self.cfg.input_size)
        x /= np.float32(PIXEL_SCALE)
        x -= self._mean
        x /= self._std
        return x

    def postprocess(self, mask: np.ndarray, height: int, width: int) -> np.ndarray:
        """Net mask (S x S) -> float32 HxW alpha in [0, 1], by the masker's own reference (``cfg.postprocess``)."""
        return POSTPROCESS[self.cfg.postprocess](mask, height, width)

    @staticmethod
    def _minmax(mask: np.ndarray, height: int, width: int) -> np.ndarray:
        """RMBG-1.4: bilinear resize back, then min-max normalisation."""
        y = resize_bilinear(mask, (height, width))
        lo, hi = float(y.min()), float(y.max())
        if hi > lo:
            y -= np.float32(lo)
            y /= np.float32(hi - lo)
            return y
        log.warning("RMBG returned a constant mask (%.4g); min-max normalisation skipped", lo)
        return np.full((height, width), np.clip(lo, 0.0, 1.0), np.float32)

    @staticmethod
    def _sigmoid(mask: np.ndarray, height: int, width: int) -> np.ndarray:
        """BiRefNet / RMBG-2.0 (their model cards: ``model(x)[-1].sigmoid()``, then resized to the photo): sigmoid, then bilinear resize."""
        p = np.empty_like(mask, dtype=np.float32)
        np.negative(mask, out=p)
        np.exp(p, out=p)
        p += np.float32(1.0)
        np.reciprocal(p, out=p)
        return resize_bilinear(p, (height, width))

    @staticmethod
    def _clip(mask: np.ndarray, height: int, width: int) -> np.ndarray:
        """A graph that ends in its own sigmoid: probabilities already; bilinear resize (convex: stays in [0, 1])."""
        return resize_bilinear(np.clip(mask, 0.0, 1.0).astype(np.float32), (height, width))

    def close(self) -> None:
        self.engine.close()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Normalised Bx3xSxS in, the main mask Bx1xSxS out (float32)."""
        out = self.engine(**{self.cfg.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(out[self.cfg.output_name], dtype=np.float32)

    # --- the public calls ---

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 -> float32 HxW alpha in [0, 1] (1 = subject)."""
        return self.predict_batch([rgb])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Several images through one engine call (or chunks of the batch a static graph fixes)."""
        if not images:
            return []
        x = np.stack([self.preprocess(im) for im in images])
        step = self._max_batch or len(images)
        masks = np.concatenate([self.run(x[i : i + step]) for i in range(0, len(images), step)])
        return [self.postprocess(m[0], im.shape[0], im.shape[1]) for m, im in zip(masks, images)]


POSTPROCESS = {MINMAX: Masker._minmax, SIGMOID: Masker._sigmoid, CLIP: Masker._clip}


def _check_rgb(rgb: Any) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise InputImageError(f"RMBG takes a uint8 HxWx3 RGB array, got a {desc}; convert the image to RGB uint8 first")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InputImageError(f"RMBG got an empty image of shape {rgb.shape}")


class DeviceMasker:
    """``rmbg_full`` (export --device-graphs): RMBG with its pre/post-processing inside one graph.

    It takes the uint8 photo as it is and returns the alpha at the photo's size: on TensorRT
    one upload and one download, nothing on the host in between.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 -> float32 HxW alpha in [0, 1]."""
        _check_rgb(rgb)
        out = self.engine(**{RmbgFullIO.IMAGE: np.ascontiguousarray(rgb)[None]})[RmbgFullIO.ALPHA]
        if out.shape != (1, 1, *rgb.shape[:2]):
            raise ModelError(f"{RMBG_FULL} returned shape {out.shape} for a {rgb.shape[1]}x{rgb.shape[0]} photo; expected (1, 1, {rgb.shape[0]}, {rgb.shape[1]})")
        return out[0, 0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Photos differ in size, so the graph takes them one by one."""
        return [self.predict(im) for im in images]

    def close(self) -> None:
        self.engine.close()


class MaskStage(Protocol):
    """What the pipeline asks of a masker: the subject's alpha of a photo."""

    engine: Engine

    def predict(self, rgb: np.ndarray) -> np.ndarray: ...

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...
