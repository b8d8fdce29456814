"""Fault injection for whole builds: run doit in its own session, SIGKILL it at a chosen point of a task, and
check what the kill left behind against an uninterrupted reference build."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from qwenbuild.build_dir import BuildDir
from qwenbuild.lock import Lock
from qwenbuild.manifest import load_manifest
from qwenbuild.processes import descendants
from qwenbuild.digests import content_digest
from qwenbuild.store import SEAL, member_digests
from qwenbuild.tasks import task_groups
from qwenbuild.verify import compare_locks, same_but_for_root

REPO = Path(__file__).resolve().parents[1]
# every task of a CPU build: finetune, export and infer pull in the chain, the rest are leaves
TARGETS = ["finetune", "export", "infer", "lite_ini", "launch", "rank_table"]
BUILD_TIMEOUT_S = 900
# MindSpore's own log lines say nothing about where a task is
_NOISE = ("[WARNING]", "[INFO]", "[DEBUG]", "[ERROR]")
# finetune trains into its checkpoint dir in place, so that a killed run resumes; it is sealed when complete
WRITTEN_IN_PLACE = {"output/checkpoint"}
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]{8}")

# the default manifest shrunk to a build of about a minute on two cores
REDUCTIONS = [("dataset.num_train", "300"), ("dataset.num_heldout", "20"), ("dataset.seq_length", "48"),
              ("train.steps", "6"), ("train.save_steps", "2"), ("train.batch_size", "4"),
              ("train.eval_max_new_tokens", "8"), ("export.seq_length", "48"), ("export.predict_data", '"Hello"'),
              ("export.max_new_tokens", "8")]


def reduced_manifest(directory: Path) -> Path:
    from qwenbuild.manifest.edit import set_keys

    path = Path(directory) / "qwen.toml"
    shutil.copyfile(REPO / "qwen.toml", path)
    set_keys(path, REDUCTIONS)
    return path


def task_line(text: str) -> tuple[str, str] | None:
    """('.', task) when doit starts a task, ('--', task) when it finds one up to date."""
    if text.startswith(".  ") or text.startswith("-- "):
        return text[:2].strip(), text[3:].strip()
    return None


def line_key(text: str) -> str:
    """What identifies a progress line across runs: its first three words (no paths, pids or timings)."""
    return " ".join(text.split()[:3])


@dataclasses.dataclass
class Line:
    t: float
    text: str


def snapshot_code(directory: Path) -> Path:
    """A copy of the package, dodo.py and the schema: every build of a session runs one version of the code."""
    directory = Path(directory)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "qwenbuild", directory / "qwenbuild", ignore=ignore)
    shutil.copytree(REPO / "schemas", directory / "schemas", ignore=ignore)
    for name in ("dodo.py", "README.md"):
        shutil.copyfile(REPO / name, directory / name)
    return directory


def doit_with(code: Path | None, env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """The environment and dodo.py that run doit with `code` (a snapshot_code() directory), or with the working tree."""
    if code is None:
        return env, REPO / "dodo.py"
    # ahead of the editable install's finder; msrun workers inherit it
    path = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, "PYTHONPATH": path}, Path(code) / "dodo.py"


class Build:
    """One doit run in its own session; its merged output is read by a thread and kept with arrival times.

    `code`: a snapshot_code() directory to build with instead of the working tree."""

    def __init__(self, manifest: Path, code: Path | None = None, targets: list[str] = TARGETS):
        env, dodo = doit_with(code, {**os.environ, "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(dodo), f"manifest={manifest}",
                                      *targets], cwd=manifest.parent,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.manifest = manifest
        self.started = time.monotonic()
        self.finished_before_kill = False
        self.lines: list[Line] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for text in self.proc.stdout:
            line = Line(time.monotonic(), text.rstrip("\n"))
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def next_line(self, timeout: float | None = None) -> Line | None | bool:
        """The next line, None at the end of the output, False when `timeout` passed first."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return False

    def wait(self) -> int:
        try:
            self.proc.wait(timeout=max(1.0, BUILD_TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"build did not finish in {BUILD_TIMEOUT_S} s:\n{self.output()[-3000:]}")
        self._reader.join(timeout=30)
        return self.proc.returncode

    def kill(self) -> list[int]:
        """SIGKILL the build's process group; returns every process that was below doit at that moment."""
        self.finished_before_kill = self.proc.poll() is not None
        tree = [self.proc.pid, *descendants(self.proc.pid)]
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self._reader.join(timeout=30)
        return tree

    def output(self) -> str:
        return "\n".join(line.text for line in self.lines)

    def tasks(self, mark: str) -> list[str]:
        return [found[1] for found in map(task_line, (line.text for line in self.lines)) if found and found[0] == mark]

    def ran(self) -> list[str]:
        return self.tasks(".")

    def skipped(self) -> list[str]:
        """Tasks found up to date (a group of tasks, like export, reads and writes nothing itself)."""
        groups = {g.name for g in task_groups(load_manifest(self.manifest))}
        return [t for t in self.tasks("--") if t not in groups]


def doit_status(manifest: Path, code: Path | None = None) -> dict[str, str]:
    """Task -> 'R' (would run) or 'U' (up to date), as `doit list --status` decides it without running anything."""
    env, dodo = doit_with(code, dict(os.environ))
    proc = subprocess.run([sys.executable, "-m", "doit", "list", "-f", str(dodo), "--status", "--all",
                           f"manifest={manifest}"], cwd=manifest.parent, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {words[1]: words[0] for words in map(str.split, proc.stdout.splitlines()) if len(words) >= 2}


def alive(pid: int) -> bool:
    """True for a running process; a zombie has already died."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def survivors(pids: list[int], grace_s: float = 10.0) -> list[str]:
    """Processes of a killed build still running after `grace_s` (their command lines); they are then killed."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = []
    for pid in pids:
        if alive(pid):
            try:
                left.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:200])
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return left


@dataclasses.dataclass
class Timeline:
    """Where a task is as it runs, from the reference build: progress lines (key, seconds after its start)."""

    task: str
    anchors: list[tuple[str, float]]
    end: float

    def gap_after(self, i: int) -> float:
        return (self.anchors[i + 1][1] if i + 1 < len(self.anchors) else self.end) - self.anchors[i][1]


def timelines(build: Build) -> dict[str, Timeline]:
    """Per task run by `build`: its start line, its progress lines and when its `done` line came."""
    out, current, start = {}, None, 0.0
    for line in build.lines:
        found = task_line(line.text)
        if found:
            current = None
            if found[0] == ".":
                current, start = found[1], line.t
                out[current] = Timeline(current, [(line.text, 0.0)], 0.0)
            continue
        if current is None or line.text.startswith(_NOISE) or not line.text.strip():
            continue
        if line.text.startswith(f"qwenbuild {current}: done"):
            out[current].end = line.t - start
            current = None
        else:
            out[current].anchors.append((line_key(line.text), line.t - start))
    return out


@dataclasses.dataclass
class KillPoint:
    """Kill `delay` seconds after the `occurrence`-th line with key `key` of the task (0: its start line)."""

    task: str
    key: str
    occurrence: int
    delay: float


def kill_points(lines: dict[str, Timeline], rng) -> list[KillPoint]:
    """One point per task: a random progress line of it, then a random fraction of the time to its next line.

    Drawing the line first gives short phases between long ones (training steps and checkpoint saves between
    compilation and evaluation) as many kills as the long phases get."""
    points = []
    for task, timeline in lines.items():
        i = rng.randrange(len(timeline.anchors))
        key = timeline.anchors[i][0]
        occurrence = sum(1 for k, _ in timeline.anchors[:i] if k == key)
        points.append(KillPoint(task, key, occurrence, rng.random() * max(timeline.gap_after(i), 0.0)))
    return points


@dataclasses.dataclass
class Kill:
    point: KillPoint | None  # None: the build finished without starting a task still to be killed
    build: Build
    processes: list[int] = dataclasses.field(default_factory=list)
    anchored: bool = False  # the chosen progress line was seen (else the kill came when the task ended)


def run_and_kill(manifest: Path, points: dict[str, KillPoint], code: Path | None = None) -> Kill:
    """Run the build; at the first start of a task in `points`, kill the build at that task's point."""
    build = Build(manifest, code)
    point, seen, deadline, anchored = None, 0, None, False
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        line = build.next_line(timeout)
        if line is False or (line is None and deadline is not None):
            return Kill(point, build, build.kill(), anchored)
        if line is None:
            build.wait()
            return Kill(None, build)
        found = task_line(line.text)
        if point is None:
            if found and found[0] == "." and found[1] in points:
                point = points[found[1]]
                if point.occurrence == 0 and point.key == line.text:
                    deadline, anchored = line.t + point.delay, True
            continue
        if found:  # the task ended before its chosen line or delay: kill at once, in whatever comes next
            return Kill(point, build, build.kill(), anchored)
        if deadline is not None:
            continue
        if line_key(line.text) == point.key:
            if seen == point.occurrence:
                deadline, anchored = line.t + point.delay, True
            seen += 1


def temporaries(root: Path) -> list[Path]:
    """Temporary siblings (.name.tmp-PID-XXXXXXXX, .name.old-...) anywhere below the build dir."""
    return sorted(p for p in Path(root).rglob(".*") if TEMPORARY.match(p.name))


def trusted_tasks(root: Path) -> set[str]:
    """Tasks whose lock entry still matches every artifact on disk: the ones a build may skip."""
    lock = Lock(BuildDir(root).lock)
    return {task for task in lock.read()["tasks"] if lock.intact(task, root) is None}


def without_step_times(data: bytes) -> dict | None:
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    if isinstance(meta, dict) and isinstance(meta.get("history"), dict):
        meta["history"].pop("step_s", None)
    return meta


def same_but_step_times(a: Path, b: Path) -> bool:
    """meta.json of a checkpoint records per-step timings; equal apart from them counts as equal (for now)."""
    if a.name != "meta.json" or not a.is_file() or not b.is_file():
        return False
    old = without_step_times(a.read_bytes())
    return old is not None and old == without_step_times(b.read_bytes())


def _same_file(ref: Path, mine: Path, ref_root: Path, root: Path) -> bool:
    if content_digest(ref) == content_digest(mine):
        return True
    # run.json, the YAML and launch scripts name the build dir itself
    return same_but_step_times(ref, mine) or same_but_for_root(ref, mine, ref_root, root)


def reference_artifacts(ref_root: Path) -> list[tuple[str, str, dict]]:
    """(task, path relative to the build dir, lock entry) of every artifact of the reference build."""
    tasks = Lock(BuildDir(ref_root).lock).read()["tasks"]
    return [(task, rel, art) for task, entry in sorted(tasks.items()) for rel, art in sorted(entry["artifacts"].items())]


def leftover_problems(root: Path, ref_root: Path) -> list[str]:
    """What a kill must never leave: a lock entry that does not match the disk, a seal over other members, or a
    file at a final path whose bytes differ from the uninterrupted build's."""
    problems = []
    try:
        json.loads(BuildDir(root).lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except ValueError as exc:
        problems.append(f"qwen.lock is not valid JSON: {exc}")
    lock = Lock(BuildDir(root).lock)
    for task in lock.read()["tasks"]:
        reason = lock.intact(task, root)
        if reason:
            problems.append(f"lock entry of {task} does not match the disk: {reason}")
    for task, rel, art in reference_artifacts(ref_root):
        mine = root / rel
        if art["kind"] == "file":
            if mine.is_file() and not _same_file(ref_root / rel, mine, ref_root, root):
                problems.append(f"{rel} (of {task}) is at its final path but differs from the reference")
            continue
        if not mine.is_dir():
            continue
        seal = mine / SEAL
        if not seal.is_file() and rel not in WRITTEN_IN_PLACE:
            problems.append(f"{rel} (of {task}) is at its final path without its seal")
        if seal.is_file():
            sealed = json.loads(seal.read_text(encoding="utf-8"))
            if sealed != member_digests(mine):
                problems.append(f"{rel} (of {task}) is sealed, but its members differ from its seal")
        if not seal.is_file() and rel in WRITTEN_IN_PLACE:
            # a run still in progress: its members are the last saved state, not yet the final bytes
            problems += [f"{rel}/{p.relative_to(mine)} (of {task}) is not valid JSON: a half-written save"
                         for p in sorted(mine.rglob("*.json")) if without_step_times(p.read_bytes()) is None]
            continue
        for member in sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*") if p.is_file()):
            # a seal is never a member: a directory inside a directory artifact carries its own (rank_N/)
            if Path(member).name == SEAL or TEMPORARY.match(Path(member).name):
                continue
            if member in art["members"]:
                if not _same_file(ref_root / rel / member, mine / member, ref_root, root):
                    problems.append(f"{rel}/{member} (of {task}) differs from the reference")
            elif seal.is_file():
                problems.append(f"{rel}/{member} (of {task}) is sealed but the reference has no such member")
    return problems


def lock_differences(ref_root: Path, root: Path) -> list[str]:
    """Artifacts whose recorded digests differ between two build dirs, both ways (step timings aside)."""
    out = []
    for a, b in ((ref_root, root), (root, ref_root)):
        diffs, _ = compare_locks(a, b)
        for d in diffs:
            rel = Path(d.artifact)
            if not same_but_step_times(a / rel, b / rel):
                out.append(str(d))
    return sorted(set(out))


def flip_byte(path: Path, offset: int | None = None) -> int:
    """Invert one byte of `path` in place (the middle one by default); returns its offset."""
    size = path.stat().st_size
    offset = size // 2 if offset is None else offset
    mode = path.stat().st_mode
    os.chmod(path, mode | 0o200)  # MindSpore saves checkpoints read-only
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, mode)
    return offset
