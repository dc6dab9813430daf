"""Request bodies -> typed requests: multipart forms and JSON with base64 images, parsed in memory.

Multipart goes through python-multipart's streaming parser with our callbacks collecting each part
into memory (Starlette's form parser spools files above 1 MB to a temporary file; nothing of a
request may touch the disk here). The body is already bounded by ``--max-bytes``. Values are
converted by the CLI's own argument types (:mod:`trt_bgswap.cli.options`), so a bad value gets
the message the CLI prints for the same option. Filenames a client sends are never used: no
request value reaches a file path.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from trt_bgswap.cli.composite_options import build_composite_options, parse_offset
from trt_bgswap.cli.options import color, float_range, int_range, parse_size
from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.compose import CompositeOptions

MAX_PARTS = 16  # more fields than any route takes
MAX_FIELD_BYTES = 4096  # a prompt longer than this is far past CLIP's 77 tokens
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
FILE_FIELDS = ("image", "mask")
# the composite options, named as `run`'s flags with - as _ (--no-decontaminate is decontaminate=false)
COMPOSITE_FIELDS = ("decontaminate", "refine_alpha", "grain", "harmonize", "shadow", "shadow_offset", "shadow_blur", "shadow_opacity")
REPLACE_FIELDS = ("image", "mask", "prompt", "negative_prompt", "seed", "steps", "guidance", "bg_color", "size", "format", *COMPOSITE_FIELDS)
MASK_FIELDS = ("image", "cutout", "format")

Fields = dict[str, "str | bytes"]


@dataclass(frozen=True)
class ReplaceRequest:
    image: bytes
    mask: bytes | None
    prompt: str | None
    negative_prompt: str
    seed: int | None
    steps: int
    guidance: float
    bg_color: tuple[int, int, int] | None
    size: tuple[int, int] | None
    format: str  # png / jpeg / webp
    composite: CompositeOptions = CompositeOptions()


@dataclass(frozen=True)
class MaskRequest:
    image: bytes
    cutout: bool
    format: str


def parse_multipart(body: bytes, content_type: str) -> Fields:
    """Every part of a multipart/form-data body, in memory: files as bytes, other fields as text."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UsageError("multipart body without a boundary in its Content-Type; send multipart/form-data (curl -F)")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header = {"field": bytearray(), "value": bytearray()}
    state: dict[str, Any] = {"headers": {}, "data": bytearray()}

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise UsageError(f"more than {MAX_PARTS} form fields; send only the fields the route takes")
        state["headers"], state["data"] = {}, bytearray()

    def on_header_end() -> None:
        state["headers"][bytes(header["field"]).lower()] = bytes(header["value"])
        header["field"].clear()
        header["value"].clear()

    def on_part_end() -> None:
        parts.append((state["headers"], state["data"]))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": lambda data, start, end: state["data"].extend(data[start:end]),
        "on_part_end": on_part_end,
        "on_header_field": lambda data, start, end: header["field"].extend(data[start:end]),
        "on_header_value": lambda data, start, end: header["value"].extend(data[start:end]),
        "on_header_end": on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise UsageError(f"malformed multipart body ({' '.join(str(e).split())[:200]}); send multipart/form-data (curl -F)") from None
    fields: Fields = {}
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        raw_name = disposition.get(b"name")
        if raw_name is None:
            raise UsageError("a multipart part has no name in its Content-Disposition; name every field")
        name = raw_name.decode("utf-8", "replace")
        if name in fields:
            raise UsageError(f"field {_shown(name)} given twice; give each field once")
        if b"filename" in disposition:  # a file part (browsers and curl -F name=@file name the file)
            fields[name] = bytes(data)
        else:
            fields[name] = _text(name, bytes(data))
    return fields


def parse_json(body: bytes) -> Fields:
    """A JSON object whose ``image`` (and ``mask``) are base64; other values are strings, numbers or booleans."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"the body is not valid JSON ({e.__class__.__name__}: {' '.join(str(e).split())[:120]}); send a JSON object or a multipart form") from None
    if not isinstance(obj, dict):
        raise UsageError(f"the JSON body is a {type(obj).__name__}; send an object such as {{\"image\": \"<base64>\", \"prompt\": \"...\"}}")
    fields: Fields = {}
    for name, value in obj.items():
        if name in FILE_FIELDS:
            if not isinstance(value, str):
                raise UsageError(f"{name}: give the image file as a base64 string")
            try:
                fields[name] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise UsageError(f"{name}: not valid base64; encode the image file's bytes with base64") from None
        elif isinstance(value, bool):
            fields[name] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            fields[name] = _text(name, str(value).encode("utf-8", "surrogatepass"))
        elif value is None:
            continue
        else:
            raise UsageError(f"{_shown(name)}: a {type(value).__name__} is not accepted; give a string, number or boolean")
    return fields


def _text(name: str, data: bytes) -> str:
    if len(data) > MAX_FIELD_BYTES:
        raise UsageError(f"{_shown(name)} is {len(data)} bytes; form values are limited to {MAX_FIELD_BYTES}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{_shown(name)} is not UTF-8 text; send form values as UTF-8") from None


def _shown(name: str) -> str:
    return repr(name[:40])


def _check_names(fields: Fields, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise UsageError(f"unknown field(s) {', '.join(_shown(n) for n in unknown[:5])}; this route takes {', '.join(allowed)}")


def _image(fields: Fields, name: str, required: bool) -> bytes | None:
    value = fields.get(name)
    if value is None:
        if required:
            raise UsageError(f"no {name!r} field: send the photo as a file field named {name!r} (curl -F {name}=@photo.jpg)")
        return None
    if isinstance(value, str):
        raise UsageError(f"{name!r} must be a file upload (curl -F {name}=@file.png), not a text field")
    if not value:
        raise UsageError(f"{name!r} is empty; send the image file's bytes")
    return value


def _value(fields: Fields, name: str, parse: Callable[[str], Any], default: Any = None) -> Any:
    """The CLI's argument type on a form value: its message, as the CLI prints it, on failure."""
    value = fields.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bytes):
        raise UsageError(f"{name!r} must be a text field, not a file")
    try:
        return parse(value)
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None


def _format(fields: Fields) -> str:
    fmt = _value(fields, "format", str, "png").lower()
    if fmt not in MEDIA_TYPES:
        raise UsageError(f"format={fmt[:20]!r}: choose png, jpeg or webp")
    return "jpeg" if fmt == "jpg" else fmt


def _bool(name: str) -> Callable[[str], bool]:
    def parse(text: str) -> bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"{name} must be true or false, got {text[:20]!r}")

    return parse


def replace_request(fields: Fields) -> ReplaceRequest:
    _check_names(fields, REPLACE_FIELDS)
    image = _image(fields, "image", required=True)
    assert image is not None
    prompt = _value(fields, "prompt", str)
    return ReplaceRequest(
        image=image,
        mask=_image(fields, "mask", required=False),
        prompt=prompt,
        negative_prompt=_value(fields, "negative_prompt", str, ""),
        seed=_value(fields, "seed", int_range("--seed", 0, 2**63 - 1)),
        steps=_value(fields, "steps", int_range("--steps", 1, 50), 4),
        guidance=_value(fields, "guidance", float_range("--guidance", 0.0, 30.0), 1.0),
        bg_color=_value(fields, "bg_color", color),
        size=_value(fields, "size", parse_size),
        format=_format(fields),
        composite=_composite(fields),
    )


def _composite(fields: Fields) -> CompositeOptions:
    """The composite options with `run`'s types, defaults and refusals (shadow_* without shadow=true: 400)."""
    return build_composite_options(
        decontaminate=_value(fields, "decontaminate", _bool("decontaminate"), True),
        refine_alpha=_value(fields, "refine_alpha", _bool("refine_alpha"), True),
        grain=_value(fields, "grain", _bool("grain"), False),
        harmonize=_value(fields, "harmonize", float_range("--harmonize", 0.0, 1.0), 0.0),
        shadow=_value(fields, "shadow", _bool("shadow"), False),
        shadow_offset=_value(fields, "shadow_offset", parse_offset),
        shadow_blur=_value(fields, "shadow_blur", float_range("--shadow-blur", 0.0, 1.0)),
        shadow_opacity=_value(fields, "shadow_opacity", float_range("--shadow-opacity", 0.0, 1.0)),
        spell=lambda name: f"{name}=" + ("true" if name == "shadow" else "..."),
    )


def mask_request(fields: Fields) -> MaskRequest:
    _check_names(fields, MASK_FIELDS)
    image = _image(fields, "image", required=True)
    assert image is not None
    cutout = _value(fields, "cutout", _bool("cutout"), False)
    fmt = _format(fields)
    if cutout and fmt == "jpeg":
        raise UsageError("cutout=true with format=jpeg: JPEG has no alpha channel; ask for png or webp")
    return MaskRequest(image=image, cutout=cutout, format=fmt)
