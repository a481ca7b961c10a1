"""Bulk inference over the pool: a JSONL file of rows in, one JSONL result per row out.

The seed paper's researchers classified 10k to 500k rows through such a pool. Input is either
the OpenAI batch input format (one request per line: custom_id, method, url, body) or plain JSONL
records whose fields fill a prompt template. Output is the OpenAI batch output format, one line
per row: {"id", "custom_id", "response": {"status_code", "body"} | null, "error": {"code",
"message"} | null}. Each line is appended and flushed as its row ends, so an interrupted run
resumes where it stopped: rows already in the output are not sent again, and a partial last line
(a crash mid-write) is cut off. Failures before any answer (connection errors, 429, 502, 503,
504) are retried with exponential backoff; a row that still fails is written with its error,
never dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import string
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import tenacity

from ..config import Deployment, Model
from ..errors import ConfigError, HpcserveError
from ..haproxy.config import backend_name
from ..haproxy.process import HAProxy

RETRY_STATUS = {429, 502, 503, 504}
ENDPOINTS = {"/v1/chat/completions", "/v1/completions"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One request to make: its id (custom_id), the endpoint path and the JSON body."""

    custom_id: str
    url: str
    body: dict


class _Retryable(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_rows(path: Path, *, template: str | None, model: str, max_tokens: int | None,
              id_field: str = "id") -> Iterator[Row]:
    """The rows of `path`, validated one by one.

    With `template`, each line is a JSON object whose fields fill it (Python format syntax, e.g.
    "Classify this expense: {description}"); the row id is its `id_field`, else its line number.
    Without, each line is an OpenAI batch request {"custom_id", "method": "POST", "url", "body"}.
    `model` fills a body without one; `max_tokens` one without a limit.

    Raises:
        ConfigError: a line is not JSON, lacks a field, or repeats a custom_id (the message names
            the line number).
    """
    seen: set[str] = set()
    fields = _template_fields(template) if template is not None else set()
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{where}: expected UTF-8 text, byte {exc.start} is not") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line, parse_constant=_no_constant)
            except ValueError as exc:
                raise ConfigError(f"{where}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{where}: expected a JSON object")
            if template is not None:
                missing = sorted(fields - record.keys())
                if missing:
                    raise ConfigError(f"{where}: the template needs field(s) {', '.join(missing)}")
                try:
                    prompt = template.format_map(record)
                except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
                    raise ConfigError(f"{where}: the template cannot be filled from this row ({exc})") from None
                row = Row(str(record.get(id_field, number)), "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": prompt}]})
            else:
                if not {"custom_id", "body"} <= record.keys() or not isinstance(record["body"], dict):
                    raise ConfigError(f"{where}: expected an OpenAI batch request with custom_id and body "
                                      "(or give --template for plain records)")
                url = record.get("url", "/v1/chat/completions")
                if url not in ENDPOINTS:
                    raise ConfigError(f"{where}: url {url!r} is not one of {', '.join(sorted(ENDPOINTS))}")
                row = Row(str(record["custom_id"]), url, dict(record["body"]))
            if row.custom_id in seen:
                raise ConfigError(f"{where}: custom_id {row.custom_id!r} appears twice")
            seen.add(row.custom_id)
            body = {"model": model, **row.body}
            if max_tokens is not None:
                body.setdefault("max_tokens", max_tokens)
            yield dataclasses.replace(row, body=body)


def _no_constant(name: str) -> None:
    """json.loads hook: NaN and Infinity are not JSON (RFC 8259) and no server accepts them."""
    raise ValueError(f"{name} is not a JSON number")


def _template_fields(template: str) -> set[str]:
    """The field names `template` fills from a record ("{description}" -> "description").

    Raises:
        ConfigError: a brace that is not a named field ("{}", "{0}", an unclosed "{").
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"--template: {exc}; write literal braces as {{{{ and }}}}") from None
    fields = set()
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split(".")[0].split("[")[0]
        if not root or root.isdigit():
            raise ConfigError(f"--template: expected named fields such as {{description}}, got {{{name}}}")
        fields.add(root)
    return fields


def finished_ids(output: Path) -> set[str]:
    """custom_ids already in `output`; a partial last line (an interrupted write) is cut off first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(output, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    done = set()
    for line in data.decode().splitlines():
        try:
            done.add(json.loads(line)["custom_id"])
        except (ValueError, KeyError, TypeError):
            raise HpcserveError(f"{output}: a line is not a batch result; use another --output") from None
    return done


@dataclasses.dataclass(frozen=True)
class Workload:
    """The rows of one `hpcserve batch` run.

    Attributes:
        total: rows in the input file (in its shard when `shard` is set).
        todo: rows not yet in the output file (the ones rows() yields).
        shard: (index, count): only the rows whose place in the file (0-based) modulo count is
            index (the element `index` of a job array of `count`: batches/runner.py); None: all.
    """

    input: Path
    output: Path
    template: str | None
    model: str
    max_tokens: int | None
    id_field: str
    total: int
    todo: int
    done: frozenset[str]
    shard: tuple[int, int] | None = None

    def rows(self) -> Iterator[Row]:
        """The rows still to send, read from the input again (a 500k-row file is never held in memory)."""
        return (row for row in _sharded(read_rows(self.input, template=self.template, model=self.model,
                                                  max_tokens=self.max_tokens, id_field=self.id_field), self.shard)
                if row.custom_id not in self.done)


def _sharded(rows: Iterable[Row], shard: tuple[int, int] | None) -> Iterator[Row]:
    """The rows of `shard` (index, count): every count-th from the index-th; all when None."""
    if shard is None:
        yield from rows
        return
    index, count = shard
    for place, row in enumerate(rows):
        if place % count == index:
            yield row


def workload(input_path: Path, output_path: Path, *, template: str | None, model: str,
             max_tokens: int | None, id_field: str, shard: tuple[int, int] | None = None) -> Workload:
    """Validate every line of `input_path` (before anything is sent) and find what `output_path`
    already holds (a partial last line is cut off: finished_ids). `shard`: see Workload.

    Raises:
        ConfigError: a malformed input line (read_rows), or a shard index outside 0..count-1;
        HpcserveError: the output is no batch result file.
    """
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"shard: expected an index from 0 to {shard[1] - 1}, got {shard[0]}")
    rows = functools.partial(read_rows, input_path, template=template, model=model, max_tokens=max_tokens,
                             id_field=id_field)
    total = sum(1 for _ in _sharded(rows(), shard))
    done = frozenset(finished_ids(output_path))
    todo = total - sum(1 for row in _sharded(rows(), shard) if row.custom_id in done)
    return Workload(input_path, output_path, template, model, max_tokens, id_field, total, todo, done, shard)


def default_concurrency(deployment: Deployment, model: Model) -> int:
    """Requests in flight when --concurrency is not given: the slots of the model's servers HAProxy
    has UP (at least one backend's slots), within what the frontend lets one client have at once
    (haproxy.max_requests_per_client)."""
    stats = HAProxy(deployment, "").stats()
    up = sum(1 for s in (stats.servers.values() if stats else ())
             if s.backend == backend_name(model) and s.status.startswith("UP"))
    return min(max(1, up) * model.parallel, deployment.haproxy.max_requests_per_client)


async def run(rows: Iterable[Row], base_url: str, output: Path, *, concurrency: int, api_key: str | None,
              retries: int, timeout: float, on_done: Callable[[bool], None],
              priority_class: str = "batch") -> tuple[int, int]:
    """Send `rows` through the pool, `concurrency` at a time, appending a result line per row.

    Args:
        priority_class: "batch" (the default) asks the frontend to queue these requests after
            interactive ones (X-Priority-Class: batch, see templates/haproxy.cfg.j2); "interactive"
            sends no such header (the key's own class holds).
    Returns:
        (rows answered with status 200, rows written with an error).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if priority_class == "batch":
        headers["X-Priority-Class"] = "batch"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    pending = iter(rows)  # workers take the next row in turn (one event loop: no lock needed)
    counts = [0, 0]

    @tenacity.retry(retry=tenacity.retry_if_exception_type((_Retryable, httpx.TransportError)),
                    stop=tenacity.stop_after_attempt(retries + 1),
                    wait=tenacity.wait_exponential_jitter(initial=1, max=30), reraise=True)
    async def send(client: httpx.AsyncClient, row: Row) -> httpx.Response:
        response = await client.post(row.url, json=row.body)
        if response.status_code in RETRY_STATUS:
            raise _Retryable(response.status_code, response.text[:500])
        return response

    async def worker(client: httpx.AsyncClient) -> None:
        for row in pending:
            result: dict = {"id": f"batch_req_{row.custom_id}", "custom_id": row.custom_id,
                            "response": None, "error": None}
            try:
                response = await send(client, row)
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                result["response"] = {"status_code": response.status_code, "body": body}
                if response.status_code != 200:
                    result["error"] = {"code": str(response.status_code), "message": str(body)[:500]}
            except _Retryable as exc:
                result["error"] = {"code": str(exc.status), "message": f"after {retries} retries: {exc}"}
            except httpx.HTTPError as exc:
                result["error"] = {"code": type(exc).__name__, "message": f"after {retries} retries: {exc}"}
            ok = result["error"] is None
            counts[0 if ok else 1] += 1
            os.write(fd, (json.dumps(result, separators=(",", ":")) + "\n").encode())  # one write: one whole line
            on_done(ok)

    try:
        async with httpx.AsyncClient(base_url=base_url.removesuffix("/v1"), headers=headers, limits=limits,
                                     timeout=httpx.Timeout(timeout, connect=30), trust_env=False) as client:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    finally:
        os.fsync(fd)
        os.close(fd)
    return counts[0], counts[1]
