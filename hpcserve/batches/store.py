"""Where the Batch API keeps its files and batches: SQLite (Python's sqlite3) for the metadata and
plain files beside it, all in the private state directory.

STATE_DIR/batches/
    batches.db            files and batches (one row each; a key sees only its own rows)
    files/FILE_ID.jsonl   the uploaded input files and the output and error files made from runs
    runs/BATCH_ID/        one batch's run: run.json (what the job does), token (its 0600 key),
                          output.jsonl (the engine's result lines, appended), progress.json,
                          done.json (written once every row has its line), job-%j.out; for a
                          batch on its own GPUs server-key (its llama-servers' 0600 key) and
                          per element output-I.jsonl, progress-I.json, done-I.json (runner.py)

A batch through the pool runs under a token of its own: a random key whose SHA-256 is kept here and
put in HAProxy's key map under the name of the key that made the batch, in the batch class
(access/keys.py accepted_keys), so its requests are that key's in the access log, in `hpcserve
usage` and in its limits, and queue as batch. The token is accepted while the batch is not final.
A batch on its own GPUs has no token: its requests never reach the pool.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from ..config import Deployment
from ..state import StateDir, write_private
from .objects import FINAL, APIError, not_found

#: Seconds a write waits for another one (SQLite's busy timeout).
BUSY_TIMEOUT_S = 30.0
#: The key that sees every file and batch.
OWNER = "owner"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    expires_at INTEGER);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL,
    input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL, completion_window TEXT NOT NULL, metadata TEXT,
    status TEXT NOT NULL, job_id TEXT, token_sha256 TEXT, total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, errors TEXT,
    output_file_id TEXT, error_file_id TEXT, created_at INTEGER NOT NULL, in_progress_at INTEGER,
    expires_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, expired_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER, output_expires_after INTEGER);
"""

#: Columns added since the first release of the store: (table, column, type), added to an older
#: database when it is opened.
_ADDED = (("files", "expires_at", "INTEGER"), ("batches", "output_expires_after", "INTEGER"))

#: The SQL condition "the batch has not ended", with its parameters (objects.FINAL).
_NOT_FINAL = f"status NOT IN ({', '.join('?' * len(FINAL))})"
_FINAL = tuple(sorted(FINAL))

BATCH_FIELDS = ("status", "job_id", "token_sha256", "total", "completed", "failed", "errors", "output_file_id",
                "error_file_id", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                "cancelling_at", "cancelled_at")


class Store:
    """The Batch API's files and batches of one deployment.

    Args:
        deployment: the deployment (its state directory holds everything).
    """

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.root = StateDir(deployment.state_dir).root / "batches"
        self.files_dir = self.root / "files"
        self.runs_dir = self.root / "runs"

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        for folder in (self.root, self.files_dir, self.runs_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        connection = sqlite3.connect(self.root / "batches.db", timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            connection.row_factory = sqlite3.Row
            connection.executescript(_SCHEMA)
            connection.execute("BEGIN IMMEDIATE")
            for table, column, kind in _ADDED:
                if column not in {r["name"] for r in connection.execute(f"PRAGMA table_info({table})")}:
                    connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()
        (self.root / "batches.db").chmod(0o600)

    # Files.

    def file_path(self, file_id: str) -> Path:
        """Where the content of file `file_id` lives."""
        return self.files_dir / f"{file_id}.jsonl"

    def new_file_id(self) -> str:
        """A fresh file id ("file-" and 24 hex digits)."""
        return "file-" + secrets.token_hex(12)

    def add_file(self, file_id: str, owner: str, filename: str, purpose: str, size: int,
                 expires_after: int | None = None) -> dict:
        """Record file `file_id` (its content already at file_path) of key `owner`, to expire
        `expires_after` seconds after now (None: kept until deleted); returns its row."""
        now = int(time.time())
        with self._db() as db:
            db.execute("INSERT INTO files (id, owner, filename, purpose, bytes, created_at, expires_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (file_id, owner, filename, purpose, size, now,
                                                        now + expires_after if expires_after else None))
            return dict(db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone())

    def expire_files(self, now: float | None = None) -> list[str]:
        """Delete the files whose time is up (their rows, then their contents), but not the input
        of a batch that has not ended (its job reads it; it goes at the first sweep after the
        batch ends). Returns the ids deleted. An expired file is already invisible (404) before."""
        now = int(time.time() if now is None else now)
        with self._db() as db:
            gone = [r["id"] for r in db.execute(
                f"SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? AND id NOT IN "
                f"(SELECT input_file_id FROM batches WHERE {_NOT_FINAL})", (now, *_FINAL))]
            db.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in gone])
        for file_id in gone:
            self.file_path(file_id).unlink(missing_ok=True)
        return gone

    def file(self, file_id: str, key: str) -> dict:
        """The row of file `file_id` as key `key` may see it.

        Raises:
            APIError: 404 when there is none, or it is another key's (the owner key sees all).
        """
        return self._visible("files", "file", file_id, key)

    def files(self, key: str, purpose: str | None, limit: int, after: str | None) -> list[dict]:
        """Key `key`'s files (all, for the owner key), newest first, after id `after`, up to
        `limit` + 1 (the extra one says there are more)."""
        where = "(expires_at IS NULL OR expires_at > ?)"      # not expired
        args: list[object] = [int(time.time())]
        if purpose:
            where += " AND purpose = ?"
            args.append(purpose)
        return self._listed("files", key, limit, after, where, tuple(args))

    def delete_file(self, file_id: str, key: str) -> None:
        """Delete file `file_id` (its row, then its content).

        Raises:
            APIError: 404 (see file()); 409 while a batch that has not ended reads it.
        """
        self.file(file_id, key)
        with self._db() as db:
            running = db.execute(f"SELECT id FROM batches WHERE input_file_id = ? AND {_NOT_FINAL} LIMIT 1",
                                 (file_id, *_FINAL)).fetchone()
            if running:
                raise APIError(409, f"File {file_id} is the input of batch {running['id']}, which has not ended; "
                               "cancel it first.", code="file_in_use")
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.file_path(file_id).unlink(missing_ok=True)

    # Batches.

    def new_batch_id(self) -> str:
        """A fresh batch id ("batch_" and 24 hex digits)."""
        return "batch_" + secrets.token_hex(12)

    def run_dir(self, batch_id: str) -> Path:
        """The folder of batch `batch_id`'s run."""
        return self.runs_dir / batch_id

    def add_batch(self, batch_id: str, owner: str, input_file_id: str, endpoint: str, window_s: int,
                  completion_window: str, metadata: dict | None, total: int, token_sha256: str | None,
                  output_expires_after: int | None = None) -> dict:
        """Record a new batch (status validating); returns its row. `token_sha256` None: a batch
        on its own GPUs, whose requests never reach the pool. `output_expires_after`: seconds its
        output and error files are kept from their making (None: until deleted)."""
        now = int(time.time())
        with self._db() as db:
            db.execute("INSERT INTO batches (id, owner, input_file_id, endpoint, completion_window, metadata, "
                       "status, token_sha256, total, created_at, expires_at, output_expires_after) "
                       "VALUES (?, ?, ?, ?, ?, ?, 'validating', ?, ?, ?, ?, ?)",
                       (batch_id, owner, input_file_id, endpoint, completion_window,
                        json.dumps(metadata) if metadata is not None else None, token_sha256, total, now,
                        now + window_s, output_expires_after))
            return dict(db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone())

    def batch(self, batch_id: str, key: str) -> dict:
        """The row of batch `batch_id` as key `key` may see it.

        Raises:
            APIError: 404 when there is none, or it is another key's (the owner key sees all).
        """
        return self._visible("batches", "batch", batch_id, key)

    def _visible(self, table: str, kind: str, ident: str, key: str) -> dict:
        """The row `ident` of `table` ("files" or "batches") if key `key` may see it, else the
        404 of not_found(`kind`, ...)."""
        with self._db() as db:
            row = db.execute(f"SELECT * FROM {table} WHERE id = ?", (ident,)).fetchone()
        if row is None or (key != OWNER and row["owner"] != key) or (
                table == "files" and row["expires_at"] is not None and row["expires_at"] <= time.time()):
            raise not_found(kind, ident)
        return dict(row)

    def _listed(self, table: str, key: str | None, limit: int, after: str | None, where: str = "",
                args: tuple = ()) -> list[dict]:
        """Rows of `table` that key `key` may see (all for the owner key or None) and that meet
        `where` (an SQL condition with `args`), newest first, after id `after`, up to `limit` + 1
        (the extra one says there are more)."""
        query, values = f"SELECT * FROM {table} WHERE 1", list(args)
        if where:
            query += f" AND {where}"
        if key not in (None, OWNER):
            query, values = query + " AND owner = ?", [*values, key]
        if after:
            query, values = query + f" AND seq < (SELECT seq FROM {table} WHERE id = ?)", [*values, after]
        with self._db() as db:
            return [dict(r) for r in db.execute(query + " ORDER BY seq DESC LIMIT ?", (*values, limit + 1))]

    def batches(self, key: str | None, limit: int, after: str | None = None, final: bool | None = None) -> list[dict]:
        """Batches of key `key` (all for the owner key or None), newest first, after id `after`, up
        to `limit` + 1; `final` False: only those still running."""
        return self._listed("batches", key, limit, after, *((_NOT_FINAL, _FINAL) if final is False else ()))

    def update_batch(self, batch_id: str, **fields: object) -> dict:
        """Set `fields` (names of BATCH_FIELDS) of batch `batch_id`; returns the new row.

        Raises:
            ValueError: a field that is not one of BATCH_FIELDS.
        """
        unknown = set(fields) - set(BATCH_FIELDS)
        if unknown:
            raise ValueError(f"not batch fields: {sorted(unknown)}")
        with self._db() as db:
            db.execute(f"UPDATE batches SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                       (*fields.values(), batch_id))
            return dict(db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone())

    def claim_end(self, batch_id: str, stale_s: float = 120.0) -> bool:
        """Mark batch `batch_id` finalizing if it is running (or was left finalizing more than
        `stale_s` seconds ago by a process that died); True for the one caller that did, which
        then writes its files and final status (two processes refreshing at once finalize once)."""
        now = int(time.time())
        with self._db() as db:
            claimed = db.execute(
                "UPDATE batches SET status = 'finalizing', finalizing_at = ? WHERE id = ? AND (status IN "
                "('validating', 'in_progress', 'cancelling') OR (status = 'finalizing' AND finalizing_at < ?))",
                (now, batch_id, now - stale_s))
            return claimed.rowcount == 1

    def active_tokens(self) -> list[tuple[str, str]]:
        """(owner key name, token SHA-256) of every batch not final: the keys its job sends with."""
        if not (self.root / "batches.db").exists():
            return []
        with self._db() as db:
            return [(r["owner"], r["token_sha256"]) for r in db.execute(
                f"SELECT owner, token_sha256 FROM batches WHERE token_sha256 IS NOT NULL AND {_NOT_FINAL} "
                "ORDER BY seq", _FINAL)]

    def write_run(self, batch_id: str, run: dict, key: str, key_file: str = "token") -> Path:
        """Make batch `batch_id`'s run folder with run.json and `key` in `key_file` ("token": the
        batch's pool token; "server-key": its own llama-servers' key), both 0600."""
        folder = self.run_dir(batch_id)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(folder / key_file, key + "\n")
        write_private(folder / "run.json", json.dumps(run, indent=2) + "\n")
        return folder
