"""Hyper-parameters of the streaming model.

Every field has a default that works on a laptop and reaches the quality target
on MovieLens-100K; the worker reads it as ``Settings.model`` (env
``STREAM_REC_MODEL__DIM=...``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Configuration of :class:`~stream_rec.model.StreamingModel`.

    Time values are event-time milliseconds; rates are per gradient step.
    """

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, ge=1, description="embedding width D; FAISS vectors have D + 1 columns")
    history: int = Field(20, ge=1, description="recent items kept per user (fast path)")
    seed: int = 0
    admit_after: int = Field(0, ge=0, description="0/1 = off; else an id gets a row at its Nth event")
    ttl_ms: int = Field(0, ge=0, description="0 = off; else ids idle this long (event time) expire")

    # bounds on the host state: a long-running worker stays flat
    max_users: int = Field(1_000_000, ge=0, description="0 = no cap; else when more user ids "
                           "than this are live at a chunk's end, the least recently seen (event "
                           "time) expire down to 15/16 of it")
    max_items: int = Field(1_000_000, ge=0, description="like max_users, for item ids")
    seen_max: int = Field(500, ge=0, description="0 = no cap; else each user's seen list (left "
                          "out of answers, masked in training) keeps the most recently clicked "
                          "this many distinct items")
    pending_max: int = Field(20_000, ge=0, description="with admission on: ids waiting for it "
                             "that are counted, per side; beyond it the least recently counted "
                             "is forgotten (0 = no bound)")
    shared_rows: int = Field(0, ge=0, description="0 = off; with admission on, K user rows and "
                             "K item rows shared by the ids waiting for it (row = hash(id) mod "
                             "K): their events are learned on the shared row and a user without "
                             "a row is answered from it; an admitted id's own row starts afresh")

    # slow path: sampled-softmax gradient steps per micro-batch
    lr: float = Field(0.1, gt=0, description="row-wise Adagrad learning rate")
    acc_decay: float = Field(1.0, gt=0, le=1, description="1 = Adagrad; <1 = RMSprop-style decay "
                             "of the touched rows' squared-gradient sums (keeps adapting)")
    train_chunk: int = Field(1000, ge=1, description="events per training chunk: gradient "
                             "steps run on fixed chunks counted from the start of the stream, "
                             "whatever the micro-batch boundaries")
    steps: int = Field(1, ge=1, description="gradient steps per training chunk")
    negatives: int = Field(128, ge=0, description="uniform item negatives per step (plus in-batch)")
    inbatch_negatives: int = Field(0, ge=0, description="0 = every in-batch target is a "
                                   "candidate for every event; else this many targets drawn from "
                                   "the step as shared negatives (cost N x (this + negatives))")
    replay: int = Field(2000, ge=0, description="recent events kept for replay")
    replay_per_step: int = Field(300, ge=0, description="replayed events mixed into each step")
    mask_history: bool = Field(True, description="in training, do not push down candidates that "
                               "are in the event's history (serving excludes seen items anyway)")
    mask_seen: bool = Field(True, description="like mask_history but over the user's whole seen "
                            "set (slower)")
    logq: float = Field(0.0, ge=0, description="weight of the sampling-probability correction "
                        "(log expected candidate count) subtracted from the logits")
    transition: bool = Field(False, description="add last_item_in @ M (D, D) to the query: "
                             "a learned directional next-item transition")
    tied: bool = Field(True, description="one item table for history (input) and target (output)")
    scale: float = Field(0.5, gt=0, description="multiplies the query (logit temperature)")
    init_std: float = Field(0.05, gt=0)
    l2: float = Field(0.0, ge=0, description="L2 on the gathered rows, per step")
    recency: float = Field(0.6, gt=0, description="initial weight of history slot h is recency**h")
    pos_lr_scale: float = Field(0.1, ge=0, description="learning-rate factor of the slot weights")
    time_buckets_s: list[float] = Field(
        default_factory=lambda: [1.0, 60.0, 600.0, 3600.0, 86400.0],
        description="edges (s) of the age of a history item relative to the user's newest one; "
                    "slot weights are learned per (slot, age bucket); [] = slots only")
    use_user_vector: bool = Field(True, description="add a learned per-user vector to the query")

    # fast path: decayed popularity folded into the item vector's extra column
    pop_half_life_ms: int = Field(86_400_000, gt=0, description="half-life of the popularity term")
    pop_weight: float = Field(0.0, description="weight of log decayed popularity in the score")

    # item content (docs/CONTENT.md): an item's vector is its free row + text vector @ W
    content_dim: int = Field(0, ge=0, description="width K of the items' text vectors (384 for "
                             "all-MiniLM-L6-v2); 0 = no content: the model is exactly the one "
                             "without it")
    content_lr: float = Field(0.01, gt=0, description="Adagrad rate of W (K, D), the projection "
                              "of text vectors into the item space, trained with the rows")
    content_init_std: float = Field(0.05, ge=0, description="initial std of W")

    @model_validator(mode="after")
    def _shared_needs_admission(self) -> ModelConfig:
        if self.shared_rows > 0 and self.admit_after <= 1:
            raise ValueError("shared_rows needs admission on (admit_after >= 2): only ids "
                             "waiting for admission use the shared rows")
        return self

    @model_validator(mode="after")
    def _content_needs_tied(self) -> ModelConfig:
        if self.content_dim and not self.tied:
            raise ValueError("content_dim > 0 needs tied = true (one item table)")
        return self


# Fields whose value is baked into a state's tables: a restore under another value
# would misread them, so it is refused.
FIXED_ON_RESTORE = {
    "dim": "the width of every vector table",
    "history": "the width of the history tables and of the queued and replayed events",
    "time_buckets_s": "the age buckets of the queued and replayed events and the shape of pos_w",
    "tied": "whether item.in is a copy of item.out",
    "shared_rows": "the rows reserved at the start of the user and item tables",
    "pop_half_life_ms": "the decay already folded into item.pop_log",
    "content_dim": "the width of item.text and of W (global.content_w)",
}

# Fields that did not exist in older states, with the value that reproduces how those
# states were built (so a restore under today's default applies the bound visibly).
LEGACY_VALUES: dict[str, Any] = {"max_users": 0, "max_items": 0, "seen_max": 0,
                                 "pending_max": 0, "shared_rows": 0}


class RestoreRefused(ValueError):
    """The configuration asked for cannot continue from the state being restored."""


def config_of_state(config: dict[str, Any]) -> ModelConfig:
    """The configuration a state was built with (fields it predates at their old behaviour).

    A field this version does not know means a newer version wrote the state:
    refused by name, rather than restored under settings it does not have.
    """
    unknown = sorted(set(config) - set(ModelConfig.model_fields))
    if unknown:
        raise RestoreRefused(f"the state was written with model settings this version does "
                             f"not know ({', '.join(unknown)}): restore it with the version "
                             "that wrote it")
    return ModelConfig(**{**LEGACY_VALUES, **config})


def restore_changes(old: ModelConfig, new: ModelConfig, chunk_filled: int = 0) -> list[str]:
    """The settings ``new`` changes from the state's ``old``, as ``"name: old -> new"``.

    Raises :class:`RestoreRefused` naming every field that cannot change on
    restore (:data:`FIXED_ON_RESTORE`, and ``train_chunk`` below the events
    the restored incomplete chunk already holds). Every other change applies
    from the restore on (see ``docs/MODEL.md``, "Bounds and restore").
    """
    changed = [k for k in ModelConfig.model_fields if getattr(old, k) != getattr(new, k)]
    refused = [f"{k} ({getattr(old, k)!r} in the state, {getattr(new, k)!r} asked): it fixes "
               f"{FIXED_ON_RESTORE[k]}" for k in changed if k in FIXED_ON_RESTORE]
    if "train_chunk" in changed and new.train_chunk <= chunk_filled:
        refused.append(f"train_chunk ({old.train_chunk} in the state, {new.train_chunk} asked): "
                       f"the incomplete chunk already holds {chunk_filled} events")
    if refused:
        raise RestoreRefused("cannot restore this state under the model settings asked for: "
                             + "; ".join(refused) + ". Keep the state's values, or start from "
                             "an empty store.")
    return [f"{k}: {getattr(old, k)!r} -> {getattr(new, k)!r}" for k in changed]
