"""MQTT request payloads: JSON (`image_b64`, `images_b64`, metadata keys) or raw image bytes with the
metadata in v5 user properties; the request id peeked before recording; a replayed answer."""

from __future__ import annotations

import base64
import binascii
import json

from agent.jobs import IMAGELESS
from core.errors import InputError
from core.image_io import magic_format

REQUEST_KEYS = ("mm_per_px", "source", "heatmap", "threshold", "reset", "policy", "ok_percentile", "ng_margin",
                "ng_recall", "relabel", "sample_ids", "version", "file_name")


def parse_request(action: str, payload: bytes, user: dict, max_payload_bytes: int,
                  body: object = None) -> tuple[list[bytes], dict]:
    """An MQTT request payload -> (image bytes, metadata); InputError with a code for anything unusable.

    JSON (`image_b64`, `images_b64` for fit_ok, metadata keys) or raw image bytes with the metadata in
    v5 user properties. calibrate may come without images: `threshold`, `reset`, `policy` or nothing.
    body: the JSON payload already parsed (peek_request_id's), so that a large one is parsed once.
    """
    if len(payload) > max_payload_bytes:
        raise InputError(f"payload of {len(payload)} bytes is over mqtt.max_payload_bytes ({max_payload_bytes})",
                         "payload_too_large")
    meta: dict = {}
    if payload[:1] == b"{":
        try:
            body = json.loads(payload) if body is None else body
        except (ValueError, RecursionError) as exc:
            raise InputError(f"payload is not valid JSON: {exc}", "invalid_json") from None
        if not isinstance(body, dict):
            raise InputError("JSON payload must be an object", "invalid_json")
        images = body.get("images_b64") if action == "fit_ok" and "images_b64" in body else None
        if images is None and body.get("image_b64") is not None:
            images = [body["image_b64"]]
        if images is not None and (not isinstance(images, list) or not all(isinstance(i, str) for i in images)):
            raise InputError("image_b64 must be a string and images_b64 a list of strings", "invalid_base64")
        try:
            decoded = [base64.b64decode(i, validate=True) for i in images or []]
        except (binascii.Error, ValueError):
            raise InputError("image_b64 is not valid base64", "invalid_base64") from None
        meta = {k: body[k] for k in REQUEST_KEYS if k in body}
    else:
        if payload and magic_format(payload) is None:
            raise InputError("the payload is neither a JSON object (starting with '{') nor PNG, JPEG, BMP or "
                             "TIFF bytes", "invalid_payload")
        decoded = [payload] if payload else []
        # strings: intake.params_from converts (flags, numbers) and encodes (source) for every ingress
        meta = {k: user[k] for k in REQUEST_KEYS if k in user and k != "reset"}
    if action not in IMAGELESS and not decoded:
        raise InputError("no image in the request (image_b64, images_b64 or raw image bytes)", "missing_image")
    return decoded, meta


def peek_request_id(payload: bytes, user: dict) -> tuple[object, dict | None]:
    """The request id of a message before it is recorded (JSON key, or the v5 user property), and the
    parsed JSON object if the payload is one (for parse_request)."""
    if payload[:1] == b"{":
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):  # the parser answers it: invalid_json
            return None, None
        return (body.get("request_id"), body) if isinstance(body, dict) else (None, None)
    return user.get("request_id") or None, None


def replay_messages(first: dict, response_topic: object, correlation: bytes | None) -> list[dict]:
    """A stored answer again, marked `replay: true`, to the result topic and the new response topic."""
    again = {**first, "payload": json.dumps({**json.loads(first["payload"]), "replay": True})}
    msgs = [again]
    if response_topic:
        msgs.append({**again, "topic": response_topic,
                     "correlation_b64": base64.b64encode(correlation).decode() if correlation else None})
    return msgs


def why_duplicate(other_payload: bool, in_flight: bool, kept: int) -> str:
    """Why a reused request id is answered duplicate_request rather than with its stored answer."""
    if other_payload:
        return "the request then had another payload"
    if in_flight:
        return "that request is still being processed; its result comes when it is done"
    return f"its answer is no longer kept (the last {kept} are: mqtt.replay_results)"
