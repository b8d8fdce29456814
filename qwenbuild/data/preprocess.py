"""ChatML JSON Lines -> MindRecord rows of seq_length + 1 token ids, as Qwen1.5's preprocessing makes them.

The input is streamed in fixed chunks of lines; worker processes tokenize each chunk, pad it into rows and encode
the rows as MindRecord stores them, and the parent places the finished records in pages in input order, so the
output bytes depend only on the input, never on the number of processes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import logging
import os
import time
import unicodedata
from pathlib import Path
from typing import Iterator

import numpy as np

from qwenbuild.data.chatml import message_problem, render, render_message
from qwenbuild.data.mindrecord import write_mindrecord
from qwenbuild.data.mindrecord_format import EncodedRows, encode_rows, load_index_generator
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import BadJSON, parse_json
from qwenbuild.processes import worker_pool
from qwenbuild.tokenizer.files import IM_START, pad_token_id, read_vocab
from qwenbuild.tokenizer.load import bpe_pipeline

logger = logging.getLogger(__name__)

IGNORE_TOKEN_ID = -100
TRAINED_ROLE = "assistant"
CHUNK_LINES = 256
SMALL_INPUT_BYTES = 4 << 20
MAX_PROCESSES = 256  # each loads a tokenizer (~300 MB for Qwen's): a typo must not start thousands
_PROGRESS_SECONDS = 5.0
MAX_SEQ_LENGTH = 1 << 17  # 4x the longest Qwen1.5 context; a chunk of padded rows must still fit in memory


@dataclasses.dataclass
class PreprocessStats:
    rows: int = 0
    truncated_rows: int = 0
    tokens: int = 0
    padding: int = 0
    seconds: float = 0.0
    untrainable: list[str] = dataclasses.field(default_factory=list)  # "file line N" of rows with no target
    lengths: list[np.ndarray] = dataclasses.field(default_factory=list)  # full token count of every row

    @property
    def padding_fraction(self) -> float:
        total = self.tokens + self.padding
        return self.padding / total if total else 0.0

    def summary(self, row_length: int) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        return (f"{self.rows:,} rows of {row_length} tokens, {self.truncated_rows:,} truncated, "
                f"{self.tokens:,} tokens, padding {self.padding_fraction:.1%}, "
                f"{self.seconds:.1f} s ({rate:,.0f} rows/s)")


@dataclasses.dataclass
class Chunk:
    """Lines of one input file; first_line is the 1-based number of lines[0]."""
    file: str
    first_line: int
    lines: list[bytes]


@dataclasses.dataclass
class TokenizedChunk:
    ids: np.ndarray            # int32, rows' kept tokens back to back
    lengths: np.ndarray        # int64, full token count of each row before truncation
    trained: np.ndarray | None  # bool per kept token when prompts are masked
    error: str | None = None
    line_numbers: np.ndarray | None = None  # input line of each row


@dataclasses.dataclass
class EncodedChunk:
    """A chunk's rows ready for MindRecord pages, and what the statistics need."""
    rows: EncodedRows | None
    lengths: np.ndarray        # int64, full token count of each row before truncation
    error: str | None = None
    file: str = ""
    untrainable_lines: list[int] = dataclasses.field(default_factory=list)  # rows with no target token


def input_files(input_glob: str) -> list[Path]:
    """The file itself, or the sorted files a glob pattern matches."""
    if os.path.isfile(input_glob):
        return [Path(input_glob)]
    matches = sorted(p for p in glob.glob(input_glob) if os.path.isfile(p))
    if not matches:
        raise UserError(f"no input file matches {input_glob}",
                        hint="pass the JSON Lines file written by `qwenbuild alpaca_converter`")
    return [Path(p) for p in matches]


def default_processes(files: list[Path]) -> int:
    """One encoding process per core (the writing process only places finished rows); none for small inputs,
    where starting them costs more."""
    if sum(p.stat().st_size for p in files) < SMALL_INPUT_BYTES:
        return 0
    return os.cpu_count() or 1


def count_lines(files: list[Path]) -> int:
    """Upper bound of the row count, read fast before tokenizing: it sizes the MindRecord header."""
    total = 0
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                total += block.count(b"\n")
        total += 1
    return total


def read_chunks(files: list[Path], chunk_lines: int = CHUNK_LINES) -> Iterator[Chunk]:
    for path in files:
        with open(path, "rb") as f:
            lines, first = [], 1
            for lineno, line in enumerate(f, start=1):
                if not lines:
                    first = lineno
                lines.append(line)
                if len(lines) == chunk_lines:
                    yield Chunk(str(path), first, lines)
                    lines = []
            if lines:
                yield Chunk(str(path), first, lines)


def parse_line(line: bytes) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a good line, (None, None) for a blank one, (None, problem) for a bad one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start} of the line)"
    if not text.strip():
        return None, None
    try:
        record = parse_json(text)
    except BadJSON as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(record, dict) or "messages" not in record:
        return None, 'expected an object with a "messages" list (as alpaca_converter writes)'
    problem = message_problem(record["messages"])
    return (None, problem) if problem else (record["messages"], None)


_worker: dict = {}


def init_worker(vocab_file: str, merges_file: str, row_length: int, mask_prompt: bool, pad_id: int,
                threads: bool) -> None:
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    tokenizer, _ = bpe_pipeline(vocab_file, merges_file)
    _worker.update(tokenizer=tokenizer, row_length=row_length, mask_prompt=mask_prompt, pad_id=pad_id)


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    """A chunk tokenized, padded into rows and encoded as MindRecord stores them: all the per-row work."""
    result = tokenize_chunk(chunk)
    if result.error:
        return EncodedChunk(None, result.lengths, result.error)
    rows = chunk_rows(result, _worker["row_length"], _worker["pad_id"])
    # training predicts token t+1 from tokens 0..t: the first position is never a target
    no_target = ~(rows["target_ids"][:, 1:] != IGNORE_TOKEN_ID).any(axis=1)
    return EncodedChunk(encode_rows(rows), result.lengths, file=chunk.file,
                        untrainable_lines=result.line_numbers[no_target].tolist())


def tokenize_chunk(chunk: Chunk) -> TokenizedChunk:
    """Render and tokenize every conversation of a chunk; stop at the first bad line."""
    conversations, line_numbers = [], []
    for offset, line in enumerate(chunk.lines):
        messages, problem = parse_line(line)
        if problem:
            return TokenizedChunk(np.empty(0, np.int32), np.empty(0, np.int64), None,
                                  f"{chunk.file} line {chunk.first_line + offset}: {problem}")
        if messages is not None:
            conversations.append(messages)
            line_numbers.append(chunk.first_line + offset)
    row_length = _worker["row_length"]
    texts = [render(m) for m in conversations]
    encodings = _encode(_worker["tokenizer"], texts, offsets=_worker["mask_prompt"])
    kept = [np.asarray(e.ids[:row_length], dtype=np.int32) for e in encodings]
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    trained = None
    if _worker["mask_prompt"]:
        trained = np.concatenate([_trained_tokens(m, e, row_length) for m, e in zip(conversations, encodings)]
                                 or [np.empty(0, bool)])
    ids = np.concatenate(kept) if kept else np.empty(0, np.int32)
    return TokenizedChunk(ids, lengths, trained, line_numbers=np.array(line_numbers, dtype=np.int64))


def _encode(tokenizer, texts: list[str], offsets: bool):
    """The tokenizer's encodings of texts; with offsets only when asked (finding assistant replies needs them,
    skipping them is faster)."""
    # tokenizers loads slowly: imported only when text is tokenized (the tokenizer imported it already)
    from tokenizers import normalizers

    encode = tokenizer.encode_batch if offsets else tokenizer.encode_batch_fast
    normalizer = tokenizer.normalizer
    # NFC leaves text already in NFC as it is: without the normalizer the ids and offsets are the same, and
    # tokenizing takes about 15% fewer instructions
    if isinstance(normalizer, normalizers.NFC) and all(unicodedata.is_normalized("NFC", t) for t in texts):
        tokenizer.normalizer = None
    try:
        return encode(texts, add_special_tokens=False)
    finally:
        tokenizer.normalizer = normalizer


def _trained_tokens(messages: list[dict], encoding, row_length: int) -> np.ndarray:
    """True for tokens that start inside an assistant reply (its content, <|im_end|> and newline)."""
    starts = np.array([s for s, _ in encoding.offsets[:row_length]], dtype=np.int64)
    spans, pos = [], 0
    for m in messages:
        header = len(IM_START) + len(m["role"]) + 1
        end = pos + len(render_message(m["role"], m["content"]))
        if m["role"] == TRAINED_ROLE:
            spans.append((pos + header, end))
        pos = end
    trained = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        trained |= (starts >= lo) & (starts < hi)
    return trained


def chunk_rows(result: TokenizedChunk, row_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """The three MindRecord columns for a chunk: right padding with pad_id, -100 targets on padding."""
    n = len(result.lengths)
    kept = np.minimum(result.lengths, row_length)
    input_ids = np.full((n, row_length), pad_id, dtype=np.int32)
    filled = np.arange(row_length)[None, :] < kept[:, None]
    input_ids[filled] = result.ids
    target_ids = input_ids.copy()
    # like the original, every pad id is ignored, also one typed literally in the text
    target_ids[input_ids == pad_id] = IGNORE_TOKEN_ID
    if result.trained is not None:
        untrained = np.zeros((n, row_length), dtype=bool)
        untrained[filled] = ~result.trained
        target_ids[untrained] = IGNORE_TOKEN_ID
    attention_mask = (input_ids != pad_id).astype(np.int32)
    return {"input_ids": input_ids, "target_ids": target_ids, "attention_mask": attention_mask}


@contextlib.contextmanager
def _tokenizing_pool(processes: int, init_args: tuple):
    """Worker processes (None for processes=0); they start loading while the parent imports MindSpore."""
    if processes == 0:
        init_worker(*init_args, threads=True)
        yield None
        return
    with worker_pool(processes, init_worker, (*init_args, False)) as pool:
        yield pool


def _encoded(chunks: Iterator[Chunk], pool, processes: int) -> Iterator[EncodedChunk]:
    """Results in input order; at most 2 chunks per worker are in flight, so memory stays flat."""
    if pool is None:
        yield from map(encode_chunk, chunks)
        return
    pending, loaded = collections.deque(), False
    for chunk in chunks:
        pending.append(pool.apply_async(encode_chunk, (chunk,)))
        if len(pending) > 2 * processes:
            if not loaded:  # the workers start and tokenize the first chunks meanwhile
                load_index_generator()
                loaded = True
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def preprocess(input_glob: str, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, seq_length: int,
               output_file: str | os.PathLike, file_partition: int = 1, mask_prompt: bool = False,
               processes: int | None = None) -> PreprocessStats:
    """Tokenize ChatML conversations into a MindRecord of input_ids/target_ids/attention_mask rows."""
    if not 1 <= seq_length <= MAX_SEQ_LENGTH:
        raise UserError(f"--seq_length must be between 1 and {MAX_SEQ_LENGTH:,}, found {seq_length:,}",
                        hint="the longest Qwen1.5 context is 32,768 tokens")
    if not 1 <= file_partition <= 1000:
        raise UserError(f"--file_partition must be between 1 and 1000 (MindRecord's limit), found {file_partition}")
    files = input_files(input_glob)
    pad_id = pad_token_id(read_vocab(vocab_file))
    row_length = seq_length + 1
    processes = default_processes(files) if processes is None else processes
    if not 0 <= processes <= MAX_PROCESSES:
        raise UserError(f"--processes must lie in 0..{MAX_PROCESSES} (0 tokenizes in the writing process), "
                        f"found {processes}")
    stats, start = PreprocessStats(), time.perf_counter()
    logger.debug(f"preprocess: {len(files)} input file(s), {processes} tokenizing process(es), rows of {row_length} "
                 "tokens")

    def batches(pool):
        last_report = start
        for result in _encoded(read_chunks(files), pool, processes):
            if result.error:
                raise UserError(result.error, hint="each line must be one JSON object with a \"messages\" list of "
                                "{\"role\", \"content\"} strings")
            _count(stats, result, row_length)
            yield result.rows
            if time.perf_counter() - last_report > _PROGRESS_SECONDS:
                last_report = time.perf_counter()
                logger.info(f"preprocess: {stats.rows:,} rows, {stats.rows / (last_report - start):,.0f} rows/s")
        refuse_untrainable(stats, seq_length, mask_prompt)  # inside the row stream: the output is dropped

    init_args = (str(vocab_file), str(merges_file), row_length, mask_prompt, pad_id)
    lines = count_lines(files)
    if lines == len(files) and not any(p.stat().st_size for p in files):
        raise UserError(f"{', '.join(map(str, files))}: empty, no conversations to write",
                        hint="pass the JSON Lines file written by `qwenbuild alpaca_converter`")
    # a process takes a chunk of lines at a time: more processes than chunks would only start and wait
    processes = min(processes, -(-lines // CHUNK_LINES))
    with _tokenizing_pool(processes, init_args) as pool:
        write_mindrecord(output_file, batches(pool), row_length, lines, file_partition,
                         inputs=[*files, vocab_file, merges_file])
    stats.seconds = time.perf_counter() - start
    logger.info(f"preprocess: {stats.summary(row_length)} -> {output_file}")
    return stats


def _count(stats: PreprocessStats, result: EncodedChunk, row_length: int) -> None:
    lengths = result.lengths
    stats.lengths.append(lengths)
    stats.untrainable += [f"{result.file} line {n}" for n in result.untrainable_lines]
    stats.rows += len(lengths)
    stats.truncated_rows += int((lengths > row_length).sum())
    kept = int(np.minimum(lengths, row_length).sum())
    stats.tokens += kept
    stats.padding += len(lengths) * row_length - kept


def refuse_untrainable(stats: PreprocessStats, seq_length: int, mask_prompt: bool) -> None:
    """Data that cannot train stops here, not after the training graph compiled: rows without a single target
    token, or most rows cut short."""
    row_length = seq_length + 1
    lengths = np.concatenate(stats.lengths) if stats.lengths else np.empty(0, np.int64)
    fits = (f"the longest row has {int(lengths.max()):,} tokens, 90% of rows fit in "
            f"{int(np.percentile(lengths, 90)):,}") if len(lengths) else ""
    cut = f"rows are cut at seq_length + 1 = {row_length:,} tokens"
    if stats.untrainable:
        shown = ", ".join(stats.untrainable[:5]) + (", ..." if len(stats.untrainable) > 5 else "")
        replies = " and only assistant replies are trained (mask_prompt)" if mask_prompt else ""
        raise UserError(f"{len(stats.untrainable):,} of {stats.rows:,} rows have no token to train on ({shown}): "
                        f"{cut}{replies}", hint=f"raise seq_length ({fits}), or remove those rows")
    if stats.truncated_rows * 2 > stats.rows:
        raise UserError(f"{stats.truncated_rows:,} of {stats.rows:,} rows ({stats.truncated_rows / stats.rows:.0%}) "
                        f"are longer than seq_length + 1 = {row_length:,} tokens: most of the data would be cut off",
                        hint=f"raise seq_length ({fits})")
