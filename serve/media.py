"""Media in: request bodies with a size limit, videos named by URL, pushed frames. Bad media -> APIError.

A chat request names its video by ``video_url.url``: an http(s) URL (fetched), a ``data:video/...;base64,``
URL, or, only when the server was started with ``--allowed-local-media-path DIR``, a local path or ``file://``
URL inside DIR. Decoding and probing run in worker threads: the event loop serves the other sessions meanwhile.
A pushed image is decoded in the sidecar's process by default (``image_frame``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
from starlette.requests import Request

from dispider_vllm.perception.frames import (
    FrameError,
    VideoError,
    VideoInfo,
    check_image_header,
    decode_image,
    decode_video,
    probe_video,
)
from dispider_vllm.types import EncodedFrame, Frame

from serve.errors import bad_request, too_large, unsupported_media

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
GENERIC_BINARY_TYPES = ("application/octet-stream", "binary/octet-stream")


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int
    allowed_local_path: Path | None = None
    fetch_timeout_s: float = 30.0


def media_type(content_type: str | None) -> str:
    """``"Video/MP4; codecs=..."`` -> ``"video/mp4"``."""
    return (content_type or "").split(";")[0].strip().lower()


def is_video_type(kind: str) -> bool:
    return kind.startswith("video/") or kind in GENERIC_BINARY_TYPES


# ------------------------------------------------------------------------------------------ request bodies


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be over ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, max_bytes: int) -> dict:
    body = await read_body(request, max_bytes)
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(f"the body is not valid JSON: {error}", "invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object", "invalid_json")
    return value


def decode_base64(text: object, param: str, max_bytes: int) -> bytes:
    if not isinstance(text, str) or not text:
        raise bad_request(f"'{param}' must be a non-empty base64 string", "invalid_base64", param)
    if len(text) * 3 // 4 > max_bytes:
        raise too_large(max_bytes, param)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{param}' is not valid base64", "invalid_base64", param) from None


# ----------------------------------------------------------------------------------------------- videos


async def load_video(url: object, limits: MediaLimits, param: str = "video_url.url") -> bytes:
    """The bytes of the video a ``video_url`` names."""
    if not isinstance(url, str) or not url.strip():
        raise bad_request("the video_url part needs a non-empty 'url'", "missing_video", param)
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        return _data_url_bytes(url, limits, param)
    if scheme in ("http", "https"):
        return await _fetch(url, limits, param)
    if scheme in ("file", ""):
        return await asyncio.to_thread(_read_local, url, limits, param)
    raise bad_request(
        f"unsupported video URL scheme {scheme!r}: use http(s), data: or a local path", "invalid_url", param
    )


def _data_url_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise bad_request("a data URL needs a ',' before its payload", "invalid_url", param)
    kind, *flags = header[len("data:") :].split(";")
    if not is_video_type(kind.strip().lower()):
        raise unsupported_media(f"the data URL holds {kind or 'text/plain'!r}, not a video", param=param)
    if "base64" not in flags:
        raise bad_request("a video data URL must be base64 (data:video/mp4;base64,...)", "invalid_url", param)
    return decode_base64(payload, param, limits.max_bytes)


async def _fetch(url: str, limits: MediaLimits, param: str) -> bytes:
    try:
        async with httpx.AsyncClient(follow_redirects=True, timeout=limits.fetch_timeout_s) as client:
            async with client.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise bad_request(
                        f"fetching the video failed: HTTP {response.status_code}", "video_fetch_failed", param
                    )
                kind = media_type(response.headers.get("content-type"))
                if kind and not is_video_type(kind):
                    raise unsupported_media(f"the URL serves {kind!r}, not a video", param=param)
                return await _bounded_read(response.aiter_bytes(), limits.max_bytes, param)
    except httpx.HTTPError as error:
        raise bad_request(f"fetching the video failed: {error}", "video_fetch_failed", param) from None


async def _bounded_read(chunks: AsyncIterator[bytes], max_bytes: int, param: str) -> bytes:
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes, param)
        parts.append(chunk)
    return b"".join(parts)


def _read_local(url: str, limits: MediaLimits, param: str) -> bytes:
    if limits.allowed_local_path is None:
        raise bad_request(
            "local video paths are disabled; start the server with --allowed-local-media-path", "local_media_disabled",
            param,
        )
    path = Path(unquote(urlsplit(url).path) if url.lower().startswith("file:") else url).expanduser().resolve()
    root = limits.allowed_local_path.resolve()
    if not path.is_relative_to(root):
        raise bad_request(f"local videos must lie under {root}", "local_media_forbidden", param)
    if not path.is_file():
        raise bad_request(f"no such video file: {path}", "video_not_found", param)
    if path.stat().st_size > limits.max_bytes:
        raise too_large(limits.max_bytes, param)
    return path.read_bytes()


async def probe(data: bytes, max_bytes: int, param: str | None = None) -> VideoInfo:
    """Open the container and read its header: a file that is not a video fails here with 400, up front."""
    try:
        return await asyncio.to_thread(probe_video, data, max_bytes=max_bytes)
    except VideoError as error:
        raise bad_request(f"unreadable video: {error}", "invalid_video", param) from None


async def iter_video_frames(data: bytes) -> AsyncIterator[Frame]:
    """Decode a video frame by frame in a worker thread (memory stays at one frame). Raises VideoError."""
    frames = await asyncio.to_thread(decode_video, data)
    while (frame := await asyncio.to_thread(next, frames, None)) is not None:
        yield frame


# ----------------------------------------------------------------------------------------------- frames


async def image_frame(data: bytes, timestamp: float, decode_in: str, param: str | None = None) -> Frame | EncodedFrame:
    """A pushed image as the sidecar takes it. ``decode_in`` "sidecar": its header checked here (~20 us, inline)
    and the bytes passed on, to be decoded in the sidecar's process; "server": decoded on a worker thread here."""
    try:
        if decode_in == "sidecar":
            check_image_header(data)
            return EncodedFrame(timestamp, data)
        return Frame(timestamp, await asyncio.to_thread(decode_image, data))
    except FrameError as error:
        raise bad_request(str(error), "invalid_image", param) from None


def parse_timestamp(value: object, param: str) -> float:
    try:
        timestamp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise bad_request(f"'{param}' must be a number of seconds", "invalid_timestamp", param) from None
    if not (timestamp >= 0 and timestamp != float("inf")):
        raise bad_request(f"'{param}' must be a finite number >= 0", "invalid_timestamp", param)
    return timestamp


async def frames_from_json(body: dict, max_bytes: int, decode_in: str) -> list[Frame | EncodedFrame]:
    """``{"frames": [{"timestamp": t, "image": "<base64 JPEG/PNG/WebP>"}, ...]}`` -> frames (see ``image_frame``)."""
    items = body.get("frames")
    if not isinstance(items, list) or not items:
        raise bad_request("'frames' must be a non-empty list of {timestamp, image}", "invalid_frames", "frames")
    frames = []
    for index, item in enumerate(items):
        param = f"frames[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{param}' must be an object {{timestamp, image}}", "invalid_frames", param)
        timestamp = parse_timestamp(item.get("timestamp"), f"{param}.timestamp")
        image = decode_base64(item.get("image"), f"{param}.image", max_bytes)
        frames.append(await image_frame(image, timestamp, decode_in, f"{param}.image"))
    return frames


def require_image_type(kind: str) -> None:
    if kind not in IMAGE_TYPES:
        raise unsupported_media(f"frames are {', '.join(IMAGE_TYPES)}; got {kind or 'no content type'!r}")

