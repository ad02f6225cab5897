"""The names of the model's tables, declared once.

A :class:`~stream_rec.model.state.ModelState` is a dict of numpy tables whose
name says how it lines up: ``user.*`` tables have one row per user row,
``item.*`` tables one row per item row, and ``global.*`` tables are anything
else (small tables, stored whole in every version). The model, the delta
algebra, the snapshot store and serving all refer to tables through these
constants, so a new table is declared here and nowhere else.
"""

from __future__ import annotations

from typing import Literal

USER = "user."
ITEM = "item."
GLOBAL = "global."

# user.* (U, ...)
USER_VEC = "user.vec"              # (U, D) f32 learned user vector
USER_ACC = "user.acc"              # (U,) f32 its Adagrad accumulator
USER_HIST = "user.hist"            # (U, H) i64 recent item rows, newest first (-1 empty)
USER_HIST_TS = "user.hist_ts"      # (U, H) i64 their event times (ms)
USER_LAST_TS = "user.last_ts"      # (U,) i64 newest event time (ms)
USER_EVENTS = "user.events"        # (U,) i64 events learned

# item.* (I, ...)
ITEM_VECTORS = "item.vectors"      # (I, D + 1) f32 FAISS inner-product vectors
ITEM_IN = "item.in"                # (I, D) f32 history-side embedding
ITEM_OUT = "item.out"              # (I, D) f32 target-side embedding
ITEM_BIAS = "item.bias"            # (I,) f32
ITEM_ACC_IN = "item.acc_in"        # (I,) f32 Adagrad accumulators
ITEM_ACC_OUT = "item.acc_out"
ITEM_ACC_BIAS = "item.acc_bias"
ITEM_POP_LOG = "item.pop_log"      # (I,) f64 log decayed event count, relative to t_ref
ITEM_LAST_TS = "item.last_ts"      # (I,) i64 newest event time (ms)
ITEM_EVENTS = "item.events"        # (I,) i64 events learned
ITEM_TEXT = "item.text"            # (I, K) f16 text vector (0: none); only with content_dim

# global.*
POS_W = "global.pos_w"                       # (H, NB) f32 weight per (slot, age bucket)
POS_ACC = "global.pos_acc"
TRANSITION = "global.transition"             # (D, D) f32
TRANSITION_ACC = "global.transition_acc"
CONTENT_W = "global.content_w"               # (K, D) f32 text -> item space; only with
CONTENT_ACC = "global.content_acc"           # content_dim, and its Adagrad sums
STEP = "global.step"                         # (1,) i64 training chunks completed
T_REF = "global.t_ref"                       # (1,) i64 reference time of pop_log (-1 none)
WATERMARK = "global.watermark"               # (1,) i64 newest event time learned (-1 none)
SEEN_PTR = "global.seen_indptr"              # (U + 1,) i64 CSR of each user's seen item rows,
SEEN_ITEMS = "global.seen_items"             # oldest first, at most seen_max per user
REPLAY = "global.replay_"                    # prefix of the replay ring's event columns
REPLAY_POS = "global.replay_pos"
FREE_USERS = "global.free_users"             # rows free for reuse
FREE_ITEMS = "global.free_items"
PENDING_USER_KEYS = "global.pending_user_keys"  # (P,) u64 hash of each id waiting for
PENDING_USER_COUNTS = "global.pending_user_counts"  # admission, and (P,) i64 its count,
PENDING_ITEM_KEYS = "global.pending_item_keys"  # least recently counted first
PENDING_ITEM_COUNTS = "global.pending_item_counts"
LEGACY_PENDING_USER_IDS = "global.pending_user_ids"  # the ids themselves, in older states
LEGACY_PENDING_ITEM_IDS = "global.pending_item_ids"
CHUNK = "global.chunk_"                      # prefix of the incomplete chunk's event columns
CHUNK_FILL = "global.chunk_fill"             # (1,) stream events in it
CHUNK_NEW_USERS = "global.chunk_new_users"   # rows allocated in it (initialised at its end)
CHUNK_NEW_ITEMS = "global.chunk_new_items"
# Written by a gang (model/gang_state.py): the partition each pending chunk event and
# each replay entry came from, so a restore gives it back to its owner under any gang size.
GANG_CHUNK_PARTITION = "global.gang_chunk_partition"    # (C',) i64
GANG_REPLAY_PARTITION = "global.gang_replay_partition"  # (R',) i64
GANG_REPLAY_RINGS = "global.gang_replay_rings"  # (W, 2) i64 each rank's ring: entries, next write

# A vector table held as int8 codes keeps a float32 scale per row beside them, under
# its name + ".scale" (same kind, so deltas carry it): see quant.py.
SCALE_SUFFIX = ".scale"

# What a server reads of a version (ModelState.query, seen, popular; the content term's
# young items and text; the dashboard's last event times): a serving reader decodes these
# (and their scales) and leaves the rest.
SERVED = (USER_VEC, USER_HIST, USER_HIST_TS, USER_LAST_TS, ITEM_VECTORS, ITEM_IN, ITEM_POP_LOG,
          ITEM_EVENTS, ITEM_TEXT, POS_W, TRANSITION, CONTENT_W, SEEN_PTR, SEEN_ITEMS)

# The ragged seen lists are not row-aligned: deltas carry them as their own CSR.
RAGGED = (SEEN_PTR, SEEN_ITEMS)

Kind = Literal["user", "item", "global"]


def kind(name: str) -> Kind:
    """How table ``name`` lines up: with user rows, with item rows, or not at all."""
    if name.startswith(USER):
        return "user"
    if name.startswith(ITEM):
        return "item"
    return "global"
