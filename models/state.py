"""A job's lifecycle, defined once: its states, the legal moves between them, what each move writes.

A state is the public ``status`` plus the internal ``Phase`` of the pipeline (stored in the
``stage`` column; a final status's phase is always ``done``)::

    create ─▶ queued/prepare ──prepare──▶ queued/run ──claim────────▶ running/local ◀──┐
                 │   └──────────claim_direct───────────────────────────▲              │ run_locally
                 │                           └──claim_remote──▶ running/submit ──submitted──▶ running/poll
                 └─ cancel · expire · fail (from either queued state) ─▶ cancelled · expired · failed

    running/* ── finish_<status> (the claim holder) ─▶ succeeded · failed · rejected · cancelled · expired
    running/* ── cancel_flagged, and any live state ── give_up (the holder is gone) ─▶ cancelled, failed
    any live state ── revoke (an operator revoked one of its Celery tasks) ─▶ cancelled
    running/* ── progress · request_cancel · reclaim · reclaim_remote · resume ─▶ the same state

Every move is one row of ``MOVES``: where it may start, where it leads (``None``: it stays in its
state, as a progress write does), whether only the holder of the current claim token may make it
(``fenced``), the columns its caller supplies, its fixed effects and guards, and the event it
writes to the job's log. ``models.lifecycle`` compiles each row into one conditional UPDATE; this
module is plain data, so the table reads (and is tested) without a database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


FINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)


class Phase(StrEnum):
    """Where a job is in its pipeline (the ``stage`` column)."""

    PREPARING = "prepare"  # queued: its inputs are not fetched and checked yet (cpu)
    DISPATCHED = "run"  # queued: prepared, its message is on the run (or submit) queue
    LOCAL = "local"  # running on a local engine (a GPU queue)
    SUBMITTING = "submit"  # running: being handed to a remote provider, no remote id yet
    POLLING = "poll"  # running at a provider: its remote id is stored, polls follow
    DONE = "done"  # final


@dataclass(frozen=True)
class State:
    status: JobStatus
    phase: Phase

    def __str__(self) -> str:
        return f"{self.status.value}/{self.phase.value}"

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


PREPARING = State(JobStatus.QUEUED, Phase.PREPARING)
DISPATCHED = State(JobStatus.QUEUED, Phase.DISPATCHED)
LOCAL = State(JobStatus.RUNNING, Phase.LOCAL)
SUBMITTING = State(JobStatus.RUNNING, Phase.SUBMITTING)
POLLING = State(JobStatus.RUNNING, Phase.POLLING)
ENDED = {status: State(status, Phase.DONE) for status in sorted(FINAL_STATUSES)}

QUEUED_STATES = frozenset({PREPARING, DISPATCHED})
RUNNING_STATES = frozenset({LOCAL, SUBMITTING, POLLING})
REMOTE_STATES = frozenset({SUBMITTING, POLLING})
LIVE_STATES = QUEUED_STATES | RUNNING_STATES
STATES = (PREPARING, DISPATCHED, LOCAL, SUBMITTING, POLLING, *ENDED.values())
# A new job starts here (the API's INSERT, which writes the first event too).
INITIAL = PREPARING


class Event(StrEnum):
    """The type of the event a move writes to the job's log."""

    QUEUED = "job.queued"
    PREPARED = "job.prepared"
    STARTED = "job.started"
    PROGRESS = "job.progress"
    SUBMITTED = "job.submitted"
    REROUTED = "job.rerouted"
    RESUMED = "job.resumed"
    CANCEL_REQUESTED = "job.cancel_requested"
    FINISHED = "job.finished"


# Events a webhook may carry: ``job.finished`` to every job with a webhook_url, the others only to
# jobs that opted in with ``webhook_events``. The rest live in the log only (streams read it).
WEBHOOK_EVENTS = frozenset({Event.STARTED, Event.PROGRESS, Event.FINISHED})


class Effect(StrEnum):
    """Writes a move makes by definition, besides ``updated_at`` and the event sequence."""

    CLAIM = "claim"  # a fresh claim token (given), one more attempt, started_at = now
    END = "end"  # finished_at = now
    COMPLETE = "complete"  # progress = 100
    FLAG_CANCEL = "flag_cancel"  # cancel_requested = true: the engine stops at its next step


class Guard(StrEnum):
    """Conditions on the row a move needs besides its source state (and claim token)."""

    NOT_CANCELLING = "not_cancelling"  # cancel_requested is false
    UNDER_LIMIT = "under_limit"  # attempts < max_attempts (given)
    AT_LIMIT = "at_limit"  # attempts >= max_attempts (given)
    CANCELLING = "cancelling"  # cancel_requested is true
    UNCHANGED = "unchanged"  # updated_at <= the time the caller saw (given): no write since


@dataclass(frozen=True)
class Move:
    name: str
    sources: frozenset[State]
    target: State | None  # None: the job stays in the state it is in
    event: Event
    fenced: bool = False  # only the holder of the job's current claim token may make it
    writes: tuple[str, ...] = ()  # columns the caller supplies
    keeps: tuple[str, ...] = ()  # columns the caller may supply; None leaves them as they are
    effects: frozenset[Effect] = field(default_factory=frozenset)
    guards: frozenset[Guard] = field(default_factory=frozenset)

    def allows(self, state: State) -> bool:
        return state in self.sources

    def after(self, state: State) -> State:
        """The state a job in ``state`` is in after this move."""
        if not self.allows(state):
            raise IllegalTransition(self.name, state)
        return self.target or state


_CLAIMING = frozenset({Effect.CLAIM})
_CLAIMABLE = frozenset({Guard.NOT_CANCELLING, Guard.UNDER_LIMIT})


def _finish(status: JobStatus) -> Move:
    effects = {Effect.END} | ({Effect.COMPLETE} if status is JobStatus.SUCCEEDED else set())
    return Move(
        f"finish_{status.value}",
        RUNNING_STATES,
        ENDED[status],
        Event.FINISHED,
        fenced=True,
        writes=("result", "error", "expires_at"),
        # The run's last word beside its percentage (a training's final step and loss), which the
        # throttled progress writes may not have stored yet.
        keeps=("backend", "progress_detail"),
        effects=frozenset(effects),
    )


def _end_queued(name: str, status: JobStatus) -> Move:
    return Move(
        name, QUEUED_STATES, ENDED[status], Event.FINISHED, writes=("error",), effects=frozenset({Effect.END})
    )


MOVES: dict[str, Move] = {
    move.name: move
    for move in (
        # The prepare task recorded the checked inputs and sends the job to its run queue.
        Move(
            "prepare", frozenset({PREPARING}), DISPATCHED, Event.PREPARED, writes=("inputs", "dispatched_at")
        ),
        # A worker takes a prepared job; ``claim_direct`` also takes one the API sent straight to
        # its run queue (inputs that need no network), and the worker checks them itself.
        Move("claim", frozenset({DISPATCHED}), LOCAL, Event.STARTED, effects=_CLAIMING, guards=_CLAIMABLE),
        Move("claim_direct", QUEUED_STATES, LOCAL, Event.STARTED, effects=_CLAIMING, guards=_CLAIMABLE),
        Move(
            "claim_remote",
            frozenset({DISPATCHED}),
            SUBMITTING,
            Event.STARTED,
            effects=_CLAIMING,
            guards=_CLAIMABLE,
        ),
        # A redelivered message (its worker died mid-run) takes the job again where it was, with a
        # fresh token that fences the lost run off, counting one more attempt.
        Move("reclaim", frozenset({LOCAL}), None, Event.STARTED, effects=_CLAIMING, guards=_CLAIMABLE),
        Move("reclaim_remote", REMOTE_STATES, None, Event.STARTED, effects=_CLAIMING, guards=_CLAIMABLE),
        # A provider accepted the job: its id is stored before the first poll.
        Move(
            "submitted",
            frozenset({SUBMITTING}),
            POLLING,
            Event.SUBMITTED,
            fenced=True,
            writes=("backend", "remote_id", "next_poll_at"),
        ),
        # The route fell through to a local engine: run_job takes it over (``reclaim``).
        Move(
            "run_locally", REMOTE_STATES, LOCAL, Event.REROUTED, fenced=True, writes=("backend", "remote_id")
        ),
        # The sweep resumes a silent remote job under a fresh token, if nothing wrote it since.
        Move(
            "resume",
            REMOTE_STATES,
            None,
            Event.RESUMED,
            fenced=True,
            writes=("claim_token", "next_poll_at"),
            guards=frozenset({Guard.UNCHANGED}),
        ),
        Move(
            "progress",
            RUNNING_STATES,
            None,
            Event.PROGRESS,
            fenced=True,
            writes=("progress", "progress_detail"),
        ),
        Move(
            "request_cancel",
            RUNNING_STATES,
            None,
            Event.CANCEL_REQUESTED,
            effects=frozenset({Effect.FLAG_CANCEL}),
        ),
        # A job that never ran ends at once: cancelled by its client, past its TTL, or refused while
        # preparing (a bad payload or input).
        _end_queued("cancel", JobStatus.CANCELLED),
        _end_queued("expire", JobStatus.EXPIRED),
        _end_queued("fail", JobStatus.FAILED),
        # The claim holder writes the outcome (a remote job expires when its provider dropped it).
        *(_finish(status) for status in sorted(FINAL_STATUSES)),
        # A redelivered claim finds the holder gone and the job flagged or out of attempts.
        Move(
            "cancel_flagged",
            RUNNING_STATES,
            ENDED[JobStatus.CANCELLED],
            Event.FINISHED,
            writes=("error",),
            effects=frozenset({Effect.END}),
            guards=frozenset({Guard.CANCELLING}),
        ),
        # An operator revoked one of the job's Celery tasks (Flower's Revoke or Terminate): the job
        # ends wherever it is, whoever holds its claim; a run still going sees it final and stops.
        Move(
            "revoke",
            LIVE_STATES,
            ENDED[JobStatus.CANCELLED],
            Event.FINISHED,
            writes=("error",),
            effects=frozenset({Effect.END}),
        ),
        Move(
            "give_up",
            LIVE_STATES,
            ENDED[JobStatus.FAILED],
            Event.FINISHED,
            writes=("error",),
            effects=frozenset({Effect.END}),
            guards=frozenset({Guard.AT_LIMIT}),
        ),
    )
}


def finish_move(status: JobStatus) -> Move:
    """The claim holder's move into a final ``status``."""
    return MOVES[f"finish_{status.value}"]


# The table projected onto the public statuses: which status may follow which.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    status: frozenset(
        move.after(source).status
        for move in MOVES.values()
        for source in move.sources
        if source.status is status and move.after(source).status is not status
    )
    for status in JobStatus
}


class IllegalTransition(Exception):
    """A move asked of a job in a state the move does not start from (or without its claim)."""

    def __init__(self, move: str, state: State | str):
        super().__init__(f"{move} is not a legal move from {state}")
        self.move = move
        self.state = state


def state_of(status: str, stage: str) -> State:
    """The typed state of a row's ``status`` and ``stage``; raises ValueError for an unknown pair."""
    state = State(JobStatus(status), Phase(stage))
    if state not in STATES:
        raise ValueError(f"no such state: {state}")
    return state


def sources_of(target: JobStatus) -> tuple[str, ...]:
    """Statuses from which ``target`` may be reached."""
    return tuple(sorted(src.value for src, targets in TRANSITIONS.items() if target in targets))


def is_final(status: str) -> bool:
    return status in FINAL_STATUSES
