"""The prefill and decode graphs as MindFormers r1.0 exports them: the KV cache is state inside the graph.

Both take (input_ids, batch_valid_length, batch_index, zactivate_len) and return logits [B, vocab]:
- input_ids int32 [B, S] (prefill, right-padded) or [B, 1] (decode: the token chosen last);
- batch_valid_length int32 [B]: real tokens of each row, counting the decode call's new token, whose keys and
  values go to cache slot batch_valid_length - 1;
- batch_index int64 [B]: the cache row each batch row uses (a permutation of 0..B-1);
- zactivate_len int64 [W]: its length W is the window of cache slots attention reads (W <= S).
Each layer's cache is a Parameter `model.layers.N.attention.kvcache_mgr.key_past` / `value_past` of
B * n_kv_heads / model_parallel * S rows of head_dim, row (b, h, s) = (b * heads + h) * S + s, that the graph updates
in place with ScatterUpdate: rows, because MindSpore's CPU ScatterNdUpdate copies the whole cache at every write
(the attention's reshape of the rows to [B, heads, S, head_dim] is a copy on CPU too: MindSpore does not alias a
reshaped Parameter; at a few hundred slots it costs one kernel launch per layer, at thousands about as much as the
attention's own read).
Under tensor parallelism each rank's graph holds its heads' cache and its weight slices, the all-reduces are in
the graph, and the logits are joined across ranks, so every rank returns the whole vocabulary.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from qwenbuild.model.network import F32, MASKED, QwenForCausalLM
from qwenbuild.model.params import cache_name
from qwenbuild.model.tensor_parallel import GatherLastDim, Identity


def local_cache_shape(net: QwenForCausalLM, batch_size: int, seq_length: int) -> tuple[int, ...]:
    """One layer's cache on this rank: [batch * this rank's KV heads * seq_length, head_dim]."""
    attention = net.model.layers[0].attention
    return (batch_size * attention.n_kv_heads * seq_length, attention.head_dim)


class _Graph(nn.Cell):
    """What both graphs share: the caches, the logits joined across ranks."""

    def __init__(self, net: QwenForCausalLM, batch_size: int, seq_length: int):
        super().__init__(auto_prefix=False)
        self.net, self.seq_length = net, seq_length
        self.heads, self.head_dim = net.model.layers[0].attention.n_kv_heads, net.model.layers[0].attention.head_dim
        shape = local_cache_shape(net, batch_size, seq_length)
        self.num_layers = net.cfg.num_layers
        self.key_past = ms.ParameterTuple(
            Parameter(Tensor(np.zeros(shape, np.float32)), name=cache_name(i, "key_past"), requires_grad=False)
            for i in range(self.num_layers))
        self.value_past = ms.ParameterTuple(
            Parameter(Tensor(np.zeros(shape, np.float32)), name=cache_name(i, "value_past"), requires_grad=False)
            for i in range(self.num_layers))
        self.join = GatherLastDim(net.parallel) if net.vocab_parallel else Identity()

    def logits(self, hidden, table):
        return self.join(self.net.logits(self.net.model.norm_out(hidden), table))

    def table(self):
        """The embedding table, read once per call for the lookup and a tied output projection both: a Parameter
        read again after the cache writes is copied whole first (a TensorMove of the 151,936 x 1,024 table at
        Qwen1.5-0.5B's shape), on every call."""
        return self.net.model.tok_embeddings.table()

    def cache_rows(self, index, slots):
        """Rows of cache rows `index` [B], every local head, at `slots` [B, n] -> [B * heads * n]."""
        heads = ops.reshape(ops.arange(self.heads, dtype=ms.int32), (1, -1, 1))
        rows = (ops.reshape(index, (-1, 1, 1)) * self.heads + heads) * self.seq_length + ops.expand_dims(slots, 1)
        return ops.reshape(rows, (-1,))


class PrefillGraph(_Graph):
    """The whole prompt in one call: every layer's keys and values go to the cache rows of batch_index; logits
    at position batch_valid_length - 1."""

    def construct(self, input_ids, batch_valid_length, batch_index, zactivate_len):
        table = self.table()
        hidden, keys, values = self.net.model.run(input_ids, table)
        b, s = input_ids.shape
        rows = self.cache_rows(ops.cast(batch_index, ms.int32),
                               ops.tile(ops.expand_dims(ops.arange(s, dtype=ms.int32), 0), (b, 1)))
        written = ()
        for i in range(self.num_layers):
            written += (ops.scatter_update(self.key_past[i], rows, ops.reshape(keys[i], (-1, self.head_dim))),
                        ops.scatter_update(self.value_past[i], rows, ops.reshape(values[i], (-1, self.head_dim))))
        last = ops.cast(batch_valid_length, ms.int32) - 1
        pick = ops.cast(ops.expand_dims(ops.arange(input_ids.shape[1], dtype=ms.int32), 0)
                        == ops.expand_dims(last, 1), F32)
        hidden = ops.reduce_sum(hidden * ops.expand_dims(pick, -1), 1)
        return ops.depend(self.logits(hidden, table), written)


class DecodeGraph(_Graph):
    """One new token per row: its keys and values are written at slot batch_valid_length - 1 of its cache row,
    attention reads the first len(zactivate_len) slots, later ones masked."""

    def construct(self, input_ids, batch_valid_length, batch_index, zactivate_len):
        model = self.net.model
        b = input_ids.shape[0]
        window = zactivate_len.shape[0]
        pos = ops.cast(batch_valid_length, ms.int32) - 1
        index = ops.cast(batch_index, ms.int32)
        # attention runs in cache-row order: the few query rows move, not the caches (a copy of every layer's
        # cache per token otherwise); to_rows[cache row] = its batch row
        to_rows = ops.tensor_scatter_update(ops.zeros((b,), ms.int32), ops.expand_dims(index, 1),
                                            ops.arange(b, dtype=ms.int32))
        slots = ops.expand_dims(ops.arange(window, dtype=ms.int32), 0)
        visible = slots <= ops.expand_dims(_rows(pos, to_rows), 1)
        bias = ops.reshape((1.0 - ops.cast(visible, F32)) * MASKED, (b, 1, 1, 1, window))
        cos, sin = model.rope(ops.expand_dims(ops.cast(pos, F32), 1))
        table = self.table()
        x = model.embed(input_ids, table)
        where = self.cache_rows(index, ops.expand_dims(pos, 1))  # each row's new token, every local head
        cache = (b, self.heads, self.seq_length, self.head_dim)
        for i in range(self.num_layers):
            layer = model.layers[i]
            q, k, v = layer.attention.project(layer.attention_norm(x), cos, sin)
            keys = ops.scatter_update(self.key_past[i], where, ops.reshape(k, (-1, self.head_dim)))
            values = ops.scatter_update(self.value_past[i], where, ops.reshape(v, (-1, self.head_dim)))
            keys = _first_slots(ops.reshape(keys, cache), window)
            values = _first_slots(ops.reshape(values, cache), window)
            out = layer.attention.attend(_rows(q, to_rows), keys, values, bias)
            x = layer.after_attention(x, _rows(out, index))
        return self.logits(x, table)


def _rows(x, order):
    """x[order] along the batch; a batch of one is already in order (a Gather kernel per use otherwise)."""
    return x if x.shape[0] == 1 else ops.gather(x, order, 0)


def _first_slots(cache, window: int):
    """cache[:, :, :window, :] without a StridedSlice when the window is every slot: MindSpore's CPU kernel
    copies element by element (0.8 ms per call for a tiny model's cache, 80% of a decode step)."""
    if window == cache.shape[2]:
        return cache
    b, heads, _, dim = cache.shape
    return ops.slice(cache, (0, 0, 0, 0), (b, heads, window, dim))


def graph_inputs(batch_size: int, seq_length: int, kind: str) -> tuple:
    """Example inputs of the prefill ("full") or decode ("inc") graph, for export."""
    ids = np.ones((batch_size, seq_length if kind == "full" else 1), np.int32)
    return (Tensor(ids), Tensor(np.ones((batch_size,), np.int32)), Tensor(np.arange(batch_size, dtype=np.int64)),
            Tensor(np.zeros((seq_length,), np.int64)))
