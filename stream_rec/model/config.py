"""Hyper-parameters of the streaming model.

Every field has a default that works on a laptop and reaches the quality target
on MovieLens-100K; the worker reads it as ``Settings.model`` (env
``STREAM_REC_MODEL__DIM=...``).
"""

from __future__ import annotations

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
    def _content_needs_tied(self) -> ModelConfig:
        if self.content_dim and not self.tied:
            raise ValueError("content_dim > 0 needs tied = true (one item table)")
        return self
