"""The OpenAI Batch API's objects and rules, without I/O: what a file or a batch looks like on the
wire, which input a batch accepts, how its status moves.

Shapes follow OpenAI's API reference (Files: the File object; Batch: the Batch object, its
request input and output lines), so the official `openai` client reads them unchanged:
https://platform.openai.com/docs/api-reference/batch. A batch's status moves
validating -> in_progress -> finalizing -> completed, or to failed (input refused, or the job
ended without finishing), expired (the completion window ran out) or cancelling -> cancelled.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

#: The endpoints a batch may run (OpenAI's also lists /v1/embeddings and /v1/responses).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
#: Completion windows accepted (OpenAI's: "24h" only).
COMPLETION_WINDOWS = {"24h": 24 * 3600}
#: Every batch status, in OpenAI's words.
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
            "cancelled")
#: Statuses a batch never leaves.
FINAL = frozenset({"failed", "completed", "expired", "cancelled"})
#: Metadata: at most 16 pairs, keys up to 64 characters, values up to 512 (OpenAI's limits).
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


class APIError(Exception):
    """A request the API refuses: an HTTP status and OpenAI's error object.

    Attributes:
        status: the HTTP status (400, 404, 413, ...).
        body: {"error": {"message", "type", "param", "code"}}.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def not_found(kind: str, ident: str) -> APIError:
    """The 404 for a file or batch that does not exist or belongs to another key (the same answer:
    an id says nothing about whether someone else has it)."""
    return APIError(404, f"No {kind} with id {ident!r}.", code="not_found")


@dataclasses.dataclass(frozen=True)
class InputSummary:
    """What check_input found in a valid batch input file.

    Attributes:
        rows: requests in the file.
        endpoint: the url every line names.
        models: the models the lines name.
    """

    rows: int
    endpoint: str
    models: frozenset[str]


def check_input(lines: Iterable[bytes], models: Iterable[str], max_rows: int) -> InputSummary:
    """Check a batch input file line by line (OpenAI's request input object: {"custom_id",
    "method": "POST", "url", "body"} per line, custom_ids unique, one url for all).

    Args:
        lines: the file's lines (bytes, with or without their newline).
        models: the models the pool serves; each body names one of them.
        max_rows: the most requests a file may hold (batches.max_rows).
    Returns:
        the summary.
    Raises:
        APIError: 400 naming the first bad line ("line N: ...").
    """
    served = set(models)
    seen: set[str] = set()
    endpoint = None
    named: set[str] = set()
    rows = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise APIError(400, f"{where}: not a JSON object ({exc})", param="file", code="invalid_jsonl") from None
        if not isinstance(record, dict):
            raise APIError(400, f"{where}: expected a JSON object", param="file", code="invalid_jsonl")
        custom_id, method, url, body = (record.get(k) for k in ("custom_id", "method", "url", "body"))
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            raise APIError(400, f"{where}: custom_id must be a string of 1 to 512 characters", param="custom_id",
                           code="invalid_request")
        if custom_id in seen:
            raise APIError(400, f"{where}: custom_id {custom_id!r} appears twice", param="custom_id",
                           code="duplicate_custom_id")
        if method != "POST":
            raise APIError(400, f"{where}: method must be \"POST\"", param="method", code="invalid_request")
        if url not in ENDPOINTS:
            raise APIError(400, f"{where}: url must be one of {', '.join(ENDPOINTS)}", param="url",
                           code="invalid_url")
        if endpoint is not None and url != endpoint:
            raise APIError(400, f"{where}: url {url} differs from the file's first, {endpoint}; one batch runs "
                           "one endpoint", param="url", code="mismatched_url")
        if not isinstance(body, dict):
            raise APIError(400, f"{where}: body must be a JSON object", param="body", code="invalid_request")
        model = body.get("model")
        if model not in served:
            raise APIError(400, f"{where}: body.model {model!r} is not served here; expected one of "
                           f"{', '.join(sorted(served))}", param="body.model", code="model_not_found")
        rows += 1
        if rows > max_rows:
            raise APIError(400, f"{where}: more than {max_rows} requests in one file", param="file",
                           code="too_many_requests")
        seen.add(custom_id)
        named.add(model)
        endpoint = url
    if endpoint is None:
        raise APIError(400, "the file holds no request", param="file", code="empty_file")
    return InputSummary(rows, endpoint, frozenset(named))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def check_metadata(metadata: object) -> dict[str, str] | None:
    """OpenAI's metadata: None, or up to METADATA_PAIRS string pairs within the lengths.

    Raises:
        APIError: 400 naming metadata.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY_CHARS
            and len(v) <= METADATA_VALUE_CHARS for k, v in metadata.items()):
        raise APIError(400, f"metadata: expected at most {METADATA_PAIRS} string pairs (keys up to "
                       f"{METADATA_KEY_CHARS} characters, values up to {METADATA_VALUE_CHARS})", param="metadata")
    return dict(metadata)


#: Bounds of a file's expires_after seconds (OpenAI's files and batches API: 1 hour to 30 days).
EXPIRY_RANGE_S = (3600, 2_592_000)


def check_expiry(value: object, param: str) -> int | None:
    """The seconds of an `expires_after` ({"anchor": "created_at", "seconds": N}, OpenAI's Files
    API; also a batch's `output_expires_after`), None when absent.

    Raises:
        APIError: 400 naming `param` for another anchor or seconds outside EXPIRY_RANGE_S.
    """
    if value is None:
        return None
    low, high = EXPIRY_RANGE_S
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise APIError(400, f"{param}: expected {{\"anchor\": \"created_at\", \"seconds\": N}}", param=param)
    seconds = value.get("seconds")
    if isinstance(seconds, str) and seconds.isdigit():
        seconds = int(seconds)       # multipart form fields are text
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not low <= seconds <= high:
        raise APIError(400, f"{param}.seconds: expected {low} to {high} (1 hour to 30 days), got {seconds!r}",
                       param=param)
    return seconds


def file_object(row: dict) -> dict:
    """OpenAI's File object of a stored file row (store.py)."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "expires_at": row.get("expires_at"), "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "status_details": None}


def batch_object(row: dict) -> dict:
    """OpenAI's Batch object of a stored batch row (store.py)."""
    errors = json.loads(row["errors"]) if row["errors"] else None
    return {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
            "errors": {"object": "list", "data": errors} if errors else None,
            "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
            "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
            "created_at": row["created_at"], "in_progress_at": row["in_progress_at"],
            "expires_at": row["expires_at"], "finalizing_at": row["finalizing_at"],
            "completed_at": row["completed_at"], "failed_at": row["failed_at"], "expired_at": row["expired_at"],
            "cancelling_at": row["cancelling_at"], "cancelled_at": row["cancelled_at"],
            "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None}


def page(items: list[dict], limit: int) -> dict:
    """OpenAI's list object of the first `limit` of `items` (newest first, as fetched one more)."""
    shown = items[:limit]
    return {"object": "list", "data": shown, "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None, "has_more": len(items) > limit}
