"""The API's documentation: request-body schemas for the OpenAPI document, and Swagger UI served offline.

The routes parse their bodies themselves (:mod:`.forms`), so FastAPI cannot infer the
schemas; they are declared here, once per route, for both encodings the routes accept
(multipart form fields, or JSON with base64 images).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Response
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.staticfiles import StaticFiles

log = logging.getLogger(__name__)


def _form_schema(fields: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    files = {k: v for k, v in fields.items() if v.get("format") == "binary"}
    as_json = {k: ({"type": "string", "format": "byte", "description": v["description"] + " (base64)"} if k in files else v) for k, v in fields.items()}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": fields, "required": required}},
                "application/json": {"schema": {"type": "object", "properties": as_json, "required": required}},
            },
        }
    }


FORMAT_FIELD = {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png", "description": "answer's image format"}
REPLACE_DOC = _form_schema(
    {
        "image": {"type": "string", "format": "binary", "description": "the photo (PNG, JPEG, WebP, TIFF, BMP, GIF)"},
        "prompt": {"type": "string", "description": "what the new background shows (or give bg_color)"},
        "negative_prompt": {"type": "string", "description": "what it should not show (acts when guidance > 1)"},
        "seed": {"type": "integer", "minimum": 0, "description": "same seed, same image; drawn when absent (answered in X-Seed)"},
        "steps": {"type": "integer", "minimum": 1, "maximum": 50, "default": 4, "description": "LCM steps (2-8 are useful)"},
        "guidance": {"type": "number", "minimum": 0, "maximum": 30, "default": 1.0, "description": "classifier-free guidance (1: off)"},
        "bg_color": {"type": "string", "description": "a solid background instead: '#RRGGBB', '#RGB' or a colour name"},
        "mask": {"type": "string", "format": "binary", "description": "your own subject mask (white = keep), the photo's size"},
        "size": {"type": "string", "description": "generation size WxH, multiples of the model's (64 for SD1.5)"},
        "format": FORMAT_FIELD,
        "decontaminate": {"type": "boolean", "default": True, "description": "remove the old background's colour from soft edges"},
        "refine_alpha": {"type": "boolean", "default": True, "description": "sharpen RMBG's alpha along the photo's edges (a given mask is used as it is)"},
        "grain": {"type": "boolean", "default": False, "description": "give the background the subject's sensor noise"},
        "harmonize": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0, "description": "relight the subject toward the background's light (0.5 is a good start)"},
        "shadow": {"type": "boolean", "default": False, "description": "a soft contact shadow under the subject"},
        "shadow_offset": {"type": "string", "description": "DX,DY: shadow offset, fractions of the subject's height (with shadow=true)"},
        "shadow_blur": {"type": "number", "minimum": 0, "maximum": 1, "description": "shadow blur, fraction of the subject's height (with shadow=true)"},
        "shadow_opacity": {"type": "number", "minimum": 0, "maximum": 1, "description": "shadow darkness (with shadow=true)"},
    },
    ["image"],
)
MASK_DOC = _form_schema(
    {
        "image": {"type": "string", "format": "binary", "description": "the photo"},
        "cutout": {"type": "boolean", "default": False, "description": "answer the RGBA cut-out instead of the alpha mask"},
        "format": FORMAT_FIELD,
    },
    ["image"],
)
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {t: {} for t in ("image/png", "image/jpeg", "image/webp")}, "description": "the image; X-Seed, X-Generation-Size, X-Batch-Size, X-Replica headers"},
    400: {"description": "unreadable image or bad option: {\"error\": one line}"},
    401: {"description": "missing or wrong bearer token (with --token-file)"},
    413: {"description": "too many bytes (--max-bytes) or pixels (--max-pixels)"},
    503: {"description": "queue full or models loading; see Retry-After"},
    504: {"description": "no answer within --timeout"},
}


def add_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package: /docs works on an appliance with no internet."""
    try:
        import swagger_ui_bundle
    except ImportError:  # pragma: no cover - part of the serve extra
        log.warning("swagger-ui-bundle is not installed; /docs is off (the OpenAPI document is at /openapi.json)")
        return
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="trt-bgswap API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )
