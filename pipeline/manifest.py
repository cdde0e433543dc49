"""Job manifests: read JSONL, CSV or Parquet from any store, and validate each row on its own.

Columns: `id`, `portrait`, `audio` (required); `prompt`, `output`, `truth_video` and the per-row overrides `seed`,
`steps` ("8,6,4", a list, or one int), `height`, `width` (optional), which validate into the generator's
own `model.generator.RenderSettings`. `truth_video` is a ground-truth video of the row's speech (a recorded take):
the report then scores the render's PSNR against it beside the still portrait's; it does not change the render.
Relative input paths resolve against the manifest's directory. A
row's `output` must lie inside the job's output root (a relative path, or a URI under the root) and end
in ".mp4"; by default it is `<output root>/<id>.mp4` (the id made safe).

Validation never raises for a bad row: it returns the row with an error naming the row and the problem.
Rules: a missing or empty id fails the row; of two rows with the same id (or output) the second fails;
a column the pipeline does not know fails every row that sets it (a non-empty value), so that a typo
such as `seeed` is never silently ignored, while a CSV column left empty on a row does not hurt that row.
Only an unreadable manifest (missing, unknown format, over its limits) fails the whole job.

Reading is bounded before anything is allocated: the object by `max_bytes` (ObjectTooLarge), the rows by
`max_rows` (TooManyRows). A Parquet file is small when compressed and may decode to far more, so it is also
bounded by what it decodes to, against the same `max_bytes` (ManifestTooLarge, an ObjectTooLarge): from its
footer before any row is decoded (row count, the row groups' decoded size, the number of values), then
batch by batch with text columns kept dictionary-encoded until their expanded size is counted (a value
repeated through a dictionary costs its full size once per row in Python). Its columns must hold text,
numbers or lists of numbers (a step plan).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import posixpath
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from model.config import Preset, RenderSettings
from pipeline.settings import LimitSettings
from pipeline.storage import ObjectStore, ObjectTooLarge
from pipeline.uri import confined_uri, is_under, normalize_uri, parent_uri, safe_name

REQUIRED = ("id", "portrait", "audio")
OPTIONAL = ("prompt", "output", "truth_video", "seed", "steps", "height", "width")
KNOWN_COLUMNS = frozenset(REQUIRED + OPTIONAL)
SEGMENTS_DIR = ".segments"  # under the output root: one folder per row in progress
PARQUET_BATCH_ROWS = 1024
# A value counts at least this many bytes of a Parquet manifest's decoded size: what the smallest value costs in a
# JSONL manifest ("1,"), so that a Parquet manifest never builds more Python objects than a JSONL one of that limit.
MIN_VALUE_BYTES = 2


class RowTask(BaseModel):
    """One validated manifest row, or a row that failed validation (`error` set)."""

    index: int  # position in the manifest, from 0
    id: str
    portrait: str = ""
    audio: str = ""
    prompt: str | None = None
    output: str = ""
    truth_video: str | None = None  # scored against in the report, never read by the render
    render: RenderSettings = RenderSettings()  # the row's overrides; the rest keep the model's values
    segments: str = ""  # URI prefix of this row's stored segments
    error: str | None = None


# ---------------------------------------------------------------- reading


class TooManyRows(ValueError):
    """A manifest with more rows than the caller allows; raised before the rows are built."""

    def __init__(self, uri: str, rows: int, limit: int):
        super().__init__(f"{uri}: {rows} rows or more; at most {limit} per job")
        self.rows, self.limit = rows, limit


class ManifestTooLarge(ObjectTooLarge):
    """A manifest whose rows decode to more than the size limit (a compressed Parquet file may be tiny)."""

    def __init__(self, uri: str, decoded: int, limit: int):
        ValueError.__init__(self, f"{uri}: its rows decode to {decoded} bytes or more; the limit is {limit} bytes")
        self.uri, self.limit, self.decoded = uri, limit, decoded


def read_manifest(
    uri: str, store: ObjectStore, *, max_rows: int | None = None, max_bytes: int | None = None
) -> list[dict[str, Any] | str]:
    """Raw rows in order: a dict per row, or an error string for a row that cannot even be parsed.

    Raises ValueError for an unreadable manifest (ObjectTooLarge, TooManyRows among them)."""
    uri = normalize_uri(uri)
    ext = posixpath.splitext(uri)[1].lower()
    if ext not in (".jsonl", ".csv", ".parquet"):
        raise ValueError(f"{uri}: unknown manifest format {ext!r}; use .jsonl, .csv or .parquet")
    data = store.get_bytes(uri, max_bytes=max_bytes)
    limit = max_rows if max_rows is not None else math.inf
    if ext == ".jsonl":
        rows = _read_jsonl(data, uri, limit)
    elif ext == ".csv":
        rows = _read_csv(data, uri, limit)
    else:
        rows = _read_parquet(data, uri, limit, max_bytes if max_bytes is not None else math.inf)
    return rows


def _too_many(uri: str, count: int, limit: float) -> None:
    if count > limit:
        raise TooManyRows(uri, count, int(limit))


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` one at a time (a list of them all would cost the memory the row limit bounds)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def _read_jsonl(data: bytes, uri: str, limit: float) -> list[dict[str, Any] | str]:
    rows: list[dict[str, Any] | str] = []
    for number, line in enumerate(_lines(data.decode("utf-8-sig")), start=1):
        if not line.strip():
            continue
        _too_many(uri, len(rows) + 1, limit)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append(f"line {number}: not valid JSON ({err.msg})")
            continue
        except RecursionError:
            rows.append(f"line {number}: JSON nested too deeply")
            continue
        rows.append(
            row if isinstance(row, dict) else f"line {number}: expected a JSON object, got {type(row).__name__}"
        )
    return rows


def _read_csv(data: bytes, uri: str, limit: float) -> list[dict[str, Any] | str]:
    rows: list[dict[str, Any] | str] = []
    try:
        for row in csv.DictReader(io.StringIO(data.decode("utf-8-sig"))):
            _too_many(uri, len(rows) + 1, limit)
            rows.append({k: v for k, v in row.items() if k is not None})
    except csv.Error as err:
        raise ValueError(f"{uri}: not a valid CSV manifest (line {len(rows) + 2}): {err}") from None
    return rows


def _read_parquet(data: bytes, uri: str, limit: float, max_bytes: float) -> list[dict[str, Any] | str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        metadata = parquet.metadata
        _too_many(uri, metadata.num_rows, limit)  # from the footer: no row decoded yet
        text_columns = _parquet_text_columns(parquet.schema_arrow)
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
        values = sum(group.column(j).num_values for group in groups for j in range(group.num_columns))
        decoded = max(sum(group.total_byte_size for group in groups), MIN_VALUE_BYTES * values)
        if decoded > max_bytes:
            raise ManifestTooLarge(uri, decoded, int(max_bytes))
        # Text stays dictionary-encoded while it is decoded: its expanded size is counted before any row is built.
        parquet = pq.ParquetFile(pa.BufferReader(data), read_dictionary=text_columns)
        rows: list[dict[str, Any] | str] = []
        decoded = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            _too_many(uri, len(rows) + batch.num_rows, limit)  # a footer that lies is caught batch by batch
            decoded += sum(_expanded_bytes(column) for column in batch.columns)
            if decoded > max_bytes:
                raise ManifestTooLarge(uri, decoded, int(max_bytes))
            rows += batch.to_pylist()
    except (TooManyRows, ManifestTooLarge):
        raise
    except Exception as err:  # pyarrow reports a corrupt file with several exception types
        raise ValueError(f"{uri}: not a readable Parquet manifest: {err}") from None
    return rows


def _parquet_text_columns(schema) -> list[str]:
    """The text columns of a Parquet manifest's schema; ValueError for a column that is not text, a number or a list
    of numbers (a struct or a list of text would decode without the bounds above)."""
    import pyarrow as pa

    text_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)

    def scalar(kind) -> bool:
        return pa.types.is_primitive(kind) or pa.types.is_decimal(kind) or pa.types.is_null(kind)

    text = []
    for field in schema:
        kind = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if any(is_text(kind) for is_text in text_types):
            text.append(field.name)
        elif not (scalar(kind) or (pa.types.is_list(kind) and scalar(kind.value_type))):
            raise ValueError(f"column {field.name!r} is of type {kind}; manifest columns hold text, numbers or lists "
                             "of numbers")  # fmt: skip
    return text


def _expanded_bytes(column) -> int:
    """What a decoded Arrow column costs once every value is its own: a dictionary's text counted once per use."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.DictionaryArray):
        lengths = pc.take(pc.binary_length(column.dictionary), column.indices)
        return int(pc.sum(lengths).as_py() or 0) + column.indices.nbytes
    return column.nbytes


# ---------------------------------------------------------------- validation


def validate_rows(
    raw_rows: list[dict[str, Any] | str],
    *,
    output_root: str,
    base_uri: str,
    limits: LimitSettings,
    preset: Preset,
    model_key: str = "",
) -> list[RowTask]:
    """Validate every row; `base_uri` is the directory relative inputs resolve against, `preset` the one of the
    model that will render the rows (a row's resolution is checked against it).

    `model_key` (preset + checkpoint) goes into each row's segment folder name, so a changed model or
    changed inputs never resume from another render's segments.
    """
    output_root = normalize_uri(output_root).rstrip("/")
    tasks: list[RowTask] = []
    seen_ids: dict[str, int] = {}
    seen_outputs: dict[str, str] = {}
    for index, raw in enumerate(raw_rows):
        label = f"row {index + 1}"
        if isinstance(raw, str):
            tasks.append(RowTask(index=index, id=f"#{index + 1}", error=f"{label}: {raw}"))
            continue
        row = {k: _empty_to_none(v) for k, v in raw.items()}
        row_id = row.get("id")
        if isinstance(row_id, int) and not isinstance(row_id, bool):
            row_id = str(row_id)
        if not isinstance(row_id, str) or not row_id.strip():
            tasks.append(RowTask(index=index, id=f"#{index + 1}", error=f"{label}: missing id"))
            continue
        label = f"row {index + 1} (id {row_id!r})"
        try:
            if row_id in seen_ids:
                raise ValueError(f"duplicate id (first used by row {seen_ids[row_id] + 1})")
            seen_ids[row_id] = index
            task = _validate(index, row_id, row, output_root, base_uri, limits, preset, model_key)
            if task.output in seen_outputs:
                raise ValueError(f"output {task.output} is also the output of id {seen_outputs[task.output]!r}")
            seen_outputs[task.output] = row_id
        except ValueError as err:
            tasks.append(RowTask(index=index, id=row_id, error=f"{label}: {err}"))
            continue
        tasks.append(task)
    return tasks


def _validate(index, row_id, row, output_root, base_uri, limits, preset, model_key) -> RowTask:
    unknown = sorted(k for k, v in row.items() if k not in KNOWN_COLUMNS and v is not None)
    if unknown:
        raise ValueError(
            f"unknown column(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(KNOWN_COLUMNS))}"
        )
    inputs = {}
    for column in ("portrait", "audio", "truth_video"):
        value = row.get(column)
        if column == "truth_video" and value is None:
            continue
        if column == "truth_video" and not isinstance(value, str):
            raise ValueError(f"truth_video must be a URI or path, got {type(value).__name__}")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"missing {column}")
        try:
            inputs[column] = normalize_uri(value, base=base_uri)
        except ValueError as err:
            raise ValueError(f"{column}: {err}") from None
    truth_video = inputs.pop("truth_video", None)  # not a render input: it stays out of the segment key
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    if prompt is not None and len(prompt) > limits.max_prompt_chars:
        raise ValueError(f"prompt has {len(prompt)} characters; at most {limits.max_prompt_chars}")

    render = _render_settings(row, limits)
    if render.height is not None or render.width is not None:
        preset.with_resolution(render.height or preset.video.height, render.width or preset.video.width)

    output = _output_uri(row.get("output"), row_id, output_root)
    fingerprint = json.dumps([inputs, prompt, render.model_dump(), output, model_key], sort_keys=True)
    key = f"{safe_name(row_id)}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:12]}"
    return RowTask(
        index=index,
        id=row_id,
        portrait=inputs["portrait"],
        audio=inputs["audio"],
        prompt=prompt,
        output=output,
        truth_video=truth_video,
        render=render,
        segments=f"{output_root}/{SEGMENTS_DIR}/{key}",
    )


def _output_uri(value: Any, row_id: str, output_root: str) -> str:
    if value is None:
        return f"{output_root}/{safe_name(row_id)}.mp4"
    if not isinstance(value, str):
        raise ValueError(f"output must be a URI or relative path, got {type(value).__name__}")
    if "://" in value or value.strip().startswith("/"):
        uri = normalize_uri(value)
        if not is_under(uri, output_root) or uri == output_root:
            raise ValueError(f"output {value!r} is outside the output root {output_root}")
    else:
        uri = confined_uri(output_root, value)
    if SEGMENTS_DIR in uri[len(output_root) :].split("/"):
        raise ValueError(f"output {value!r} may not be inside {SEGMENTS_DIR}/")
    if not uri.endswith(".mp4"):
        raise ValueError(f"output {value!r} must end in .mp4")
    return uri


def _empty_to_none(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, float) and math.isnan(value):
        return None  # Parquet/pandas spell a missing number as NaN
    return value


def _int(row: dict, column: str, low: int, high: int) -> int | None:
    value = row.get(column)
    if value is None:
        return None
    try:
        number = _as_int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{column} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{column} must be in [{low}, {high}], got {number}")
    return number


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    if isinstance(value, str):  # CSV: "42", or "42.0" when pandas wrote a column with gaps
        number = float(value)
        if not number.is_integer():
            raise ValueError
        return int(number)
    return int(value)


def _render_settings(row: dict, limits: LimitSettings) -> RenderSettings:
    """The row's overrides as RenderSettings (which reads the step plan), within the job's limits."""
    overrides = {
        "seed": _int(row, "seed", 0, 2**63 - 1),
        "step_plan": row.get("steps"),
        "height": _int(row, "height", 1, limits.max_height),
        "width": _int(row, "width", 1, limits.max_width),
    }
    try:
        render = RenderSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        column = {"step_plan": "steps"}
        raise ValueError(
            "; ".join(
                f"{column.get(str(e['loc'][0]), e['loc'][0])}: {e['msg'].removeprefix('Value error, ')}"
                for e in err.errors()
            )
        ) from None
    if render.step_plan and max(render.step_plan) > limits.max_steps:
        raise ValueError(f"steps: at most {limits.max_steps} per block, got {row.get('steps')!r}")
    return render


def manifest_dir(uri: str) -> str:
    """The directory a manifest's relative paths resolve against."""
    return parent_uri(normalize_uri(uri))
