"""The Qwen1.5 network in MindSpore, named like MindFormers' LlamaForCausalLM, plus its KV-cache graphs for export.

Compute is float32 (the CPU kernels); parameters may be float32, bfloat16 or float16 and are cast on use. SwiGLU,
RoPE and RMSNorm run as fused kernels where they compiled (fused_kernels), except in graphs made for export.
Wrapping cells (loss, prefill, decode, train step) must call `super().__init__(auto_prefix=False)`, otherwise
MindSpore renames the shared parameters and checkpoints no longer match `parameter_shapes(cfg)`.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from qwenbuild.dtypes import DTYPES
from qwenbuild.errors import UserError
from qwenbuild.model.config import QwenConfig
from qwenbuild.model.cpu_kernels import Softmax, add_bias, large, over_columns, over_rows, row_means, silu
from qwenbuild.model.fused_kernels import kernels
from qwenbuild.model.lora import A, B
from qwenbuild.model.params import EMBEDDING, check_names, is_beside_weights
from qwenbuild.model.tensor_parallel import Identity, ModelParallel

F32 = ms.float32
MS_DTYPES = {name: getattr(ms, name) for name in DTYPES}
# additive attention bias for masked positions: exp() underflows to exactly 0 in float32
MASKED = -1.0e30


def _param(shape, dtype, init, name):
    return Parameter(initializer(init, shape, dtype), name=name)


FUSED = ("fused_norm", "fused_rope", "fused_swiglu", "fused_softmax")


def _fused(name: str):
    """The fused kernel `name`, or None where they did not build (the composed kernels run)."""
    found = kernels()
    return getattr(found, name) if found else None


def use_composed_kernels(net: nn.Cell) -> None:
    """MindSpore's own kernels only in every cell of `net`, as exported graphs need (MindSpore Lite cannot run the
    fused ones); call before the first run."""
    for _, cell in net.cells_and_names():
        for name in FUSED:
            if getattr(cell, name, None) is not None:
                setattr(cell, name, None)


class RMSNorm(nn.Cell):
    def __init__(self, size: int, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param((size,), dtype, "ones", "weight")
        self.fused_norm = _fused("rms_norm")
        self.eps_tensor = Tensor(eps, F32)

    def construct(self, x):
        weight = ops.cast(self.weight, F32)
        rows = x if len(x.shape) == 2 else ops.reshape(x, (-1, x.shape[-1]))
        n, width = rows.shape
        if self.fused_norm is not None:
            y, _ = self.fused_norm(rows, weight, self.eps_tensor)
            return y if len(x.shape) == 2 else ops.reshape(y, x.shape)
        if not large(n, width):
            return weight * (x * ops.rsqrt(ops.mean(ops.square(x), -1, keep_dims=True) + self.eps))
        # not one outer product of 1/rms and the weight: under model parallelism that trained wrong (msrun, mp 2)
        y = (rows * over_columns(ops.rsqrt(row_means(rows * rows) + self.eps), width)) * over_rows(weight, n)
        return y if len(x.shape) == 2 else ops.reshape(y, x.shape)


class Linear(nn.Cell):
    """y = x W^T + b with W stored [out, in], as both HF and MindFormers store it; with a LoRA adapter (add_adapter)
    y also gains scale * B A dropout(x)."""

    def __init__(self, n_in: int, n_out: int, has_bias: bool, dtype):
        super().__init__()
        self.n_in, self.n_out, self.has_bias = n_in, n_out, has_bias
        self.weight = _param((n_out, n_in), dtype, Normal(0.02), "weight")
        if has_bias:
            self.bias = _param((n_out,), dtype, "zeros", "bias")
        self.matmul = ops.MatMul(transpose_b=True)
        self.adapted = False

    def add_adapter(self, cell: str, rank: int, scale: float, dropout: nn.Cell) -> None:
        """A LoRA adapter of this process's slices, A [rank, n_in] and B [n_out, rank], float32 whatever the weight's
        dtype and zero until loaded, named as MindFormers names them below `cell` (model/lora.py)."""
        self.mindpet_delta_lora_a = Parameter(Tensor(np.zeros((rank, self.n_in), np.float32)), name=f"{cell}.{A}")
        self.mindpet_delta_lora_b = Parameter(Tensor(np.zeros((self.n_out, rank), np.float32)), name=f"{cell}.{B}")
        self.lora_scale = Tensor(scale, F32)
        self.lora_dropout = dropout
        self.adapted = True

    def delta(self, flat):
        """The adapter's output for flat [N, n_in]: scale times B A dropout(x), the scale applied at the rank."""
        low = self.matmul(self.lora_dropout(flat), self.mindpet_delta_lora_a) * self.lora_scale
        return self.matmul(low, self.mindpet_delta_lora_b)

    def construct(self, x):
        # 2-D MatMul: the CPU backend has no broadcasting BatchMatMul for weights
        flat = x if len(x.shape) == 2 else ops.reshape(x, (-1, self.n_in))
        y = self.matmul(flat, ops.cast(self.weight, F32))
        if self.has_bias:
            y = add_bias(y, ops.cast(self.bias, F32))
        if self.adapted:
            y = y + self.delta(flat)
        return y if len(x.shape) == 2 else ops.reshape(y, x.shape[:-1] + (self.n_out,))


# below this many weight elements a projection group is one MatMul on weights concatenated per call: the copy
# costs less than the kernels it saves; above it, only when more tokens than input features come in
FUSE_WEIGHTS_UP_TO = 1 << 18


def fuse_weights(linears: tuple, tokens: int) -> bool:
    return sum(lin.n_out for lin in linears) * linears[0].n_in <= FUSE_WEIGHTS_UP_TO or tokens >= linears[0].n_in


def joint_projection(x, linears: tuple):
    """Linears reading the same x [N, in] -> their outputs side by side [N, sum of outputs]."""
    if not fuse_weights(linears, x.shape[0]):
        return ops.concat([lin(x) for lin in linears], -1)
    y = linears[0].matmul(x, ops.concat([ops.cast(lin.weight, F32) for lin in linears], 0))
    if linears[0].has_bias:
        y = add_bias(y, ops.concat([ops.cast(lin.bias, F32) for lin in linears], 0))
    adapted, deltas = False, ()
    for lin in linears:
        adapted = adapted or lin.adapted
        deltas += (lin.delta(x) if lin.adapted else ops.zeros((x.shape[0], lin.n_out), F32),)
    return y + ops.concat(deltas, -1) if adapted else y


def fused_linear(linears: tuple) -> "Linear":
    """One Linear whose weight (and bias) are the given ones' stacked by output rows; the given ones are emptied,
    so a large model is not held twice."""
    first = linears[0]
    fused = Linear(first.n_in, sum(lin.n_out for lin in linears), first.has_bias, first.weight.dtype)
    fused.weight.set_data(ops.concat([lin.weight for lin in linears], 0))
    if first.has_bias:
        fused.bias.set_data(ops.concat([lin.bias for lin in linears], 0))
    for part in (p for lin in linears for p in lin.get_parameters()):
        part.set_data(Tensor(np.zeros((0,), np.float32), dtype=part.dtype))
    return fused


class Split(nn.Cell):
    """x cut into parts of `sizes` along `axis`, in one Split kernel into equal pieces (ops.split runs a StridedSlice
    per part), a part of several pieces joined again; its gradient is one Concat of the parts' gradients
    (MindSpore's own writes a full-size StridedSliceGrad per part and sums them)."""

    def __init__(self, sizes: tuple[int, ...], axis: int):
        super().__init__()
        self.axis = axis
        piece = math.gcd(*sizes)
        self.pieces = tuple(size // piece for size in sizes)
        self.split = ops.Split(axis, sum(self.pieces))

    def construct(self, x):
        pieces = self.split(x)
        parts, start = (), 0
        for n in self.pieces:
            parts += (pieces[start] if n == 1 else ops.concat(pieces[start:start + n], self.axis),)
            start += n
        return parts

    def bprop(self, x, out, dout):
        return (ops.concat(dout, self.axis),)


def _split(parallel: ModelParallel, names: list[str], allowed: tuple) -> int | None:
    """The one split dimension these parameters share, refused unless the network can run it."""
    dims = {parallel.split(n) for n in names}
    if len(dims) > 1 or dims - set(allowed):
        found = ", ".join(f"{n}: {parallel.split(n)}" for n in names)
        raise UserError(f"the strategy splits {found}; qwenbuild's network runs {names[0]} split on dimension "
                        f"{' or '.join(str(a) for a in allowed if a is not None)} or whole, the same for all of them",
                        hint="use the strategy files qwenbuild writes (doit strategy) or MindFormers' Qwen1.5 layout")
    return dims.pop()


class Embedding(nn.Cell):
    """The token table; split on the vocabulary, each process looks up its rows and the slices are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype, parallel: ModelParallel):
        super().__init__()
        self.split = _split(parallel, [EMBEDDING], (None, 0)) is not None
        rows = vocab_size // parallel.size if self.split else vocab_size
        self.embedding_weight = _param((rows, hidden_size), dtype, Normal(0.02), "embedding_weight")
        self.rows, self.start = rows, parallel.index * rows
        self.reduce = parallel.reduce_out() if self.split else Identity()

    def table(self):
        """The table as the kernels read it: float32 (the CPU Gather kernel has no bfloat16; a no-op for float32)."""
        return ops.cast(self.embedding_weight, F32)

    def construct(self, input_ids, table=None):
        """Rows of input_ids; `table` is table() read once by a graph that also projects onto it (tied lm_head)."""
        table = self.table() if table is None else table
        if not self.split:
            return ops.gather(table, input_ids, 0)
        local = input_ids - self.start
        mine = ops.logical_and(local >= 0, local < self.rows)
        rows = ops.gather(table, ops.where(mine, local, 0), 0)
        return self.reduce(rows * ops.expand_dims(ops.cast(mine, F32), -1))


def rotate_half_matrix(head_dim: int) -> np.ndarray:
    """R with x @ R = concat(-x[half:], x[:half]): RoPE's rotate_half as one MatMul."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def _swap_heads_and_positions(x):
    """[B, P, Q, D] -> [B, Q, P, D]; a reshape when P or Q is 1 (one decoded token): the same bytes, no copy kernel."""
    b, p, q, d = x.shape
    if p == 1 or q == 1:
        return ops.reshape(x, (b, q, p, d))
    return ops.transpose(x, (0, 2, 1, 3))


class Attention(nn.Cell):
    """Split by model parallelism, each process holds whole heads: q/k/v by output rows, wo by input columns.

    Works on tokens as rows: x [N, hidden] with N = B * S; q, k and v come out of one projection as
    [B, S, heads, D], where RoPE is applied to every head at once (the value heads' table rows are cos 1, sin 0, and
    the query heads' carry 1/sqrt(D), so no separate scaling of the scores is needed).
    """

    def __init__(self, cfg: QwenConfig, dtype, parallel: ModelParallel, prefix: str):
        super().__init__()
        qkv = [f"{prefix}{w}.{k}" for w in ("wq", "wk", "wv") for k in ("weight", "bias")
               if k == "weight" or cfg.qkv_has_bias]
        split_qkv = _split(parallel, qkv, (None, 0)) is not None
        if split_qkv != (_split(parallel, [prefix + "wo.weight"], (None, 1)) is not None):
            raise UserError(f"the strategy splits {prefix}wo.weight and {prefix}wq.weight inconsistently",
                            hint="q/k/v split on dimension 0 go with wo split on dimension 1")
        mp = parallel.size if split_qkv else 1
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads // mp, cfg.n_kv_heads // mp, cfg.head_dim
        self.n_rep = cfg.num_heads // cfg.n_kv_heads
        h, q, kv = cfg.hidden_size, self.n_heads * cfg.head_dim, self.n_kv_heads * cfg.head_dim
        self.wq = Linear(h, q, cfg.qkv_has_bias, dtype)
        self.wk = Linear(h, kv, cfg.qkv_has_bias, dtype)
        self.wv = Linear(h, kv, cfg.qkv_has_bias, dtype)
        self.wo = Linear(q, h, False, dtype)
        self.rotate = Tensor(rotate_half_matrix(cfg.head_dim))
        kinds = np.repeat([0, 1, 2], (self.n_heads, self.n_kv_heads, self.n_kv_heads))
        scale = float(cfg.head_dim) ** -0.5
        self.head_scale = Tensor(np.choose(kinds, [scale, 1.0, 0.0]).astype(np.float32).reshape(1, 1, -1, 1))
        self.value_heads = Tensor((kinds == 2).astype(np.float32).reshape(1, 1, -1, 1))
        self.split_heads = Split((self.n_heads, self.n_kv_heads, self.n_kv_heads), 1)
        self.copy_in = parallel.copy_in() if mp > 1 else Identity()
        self.reduce = parallel.reduce_out() if mp > 1 else Identity()
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.weighted = ops.BatchMatMul()
        self.softmax = Softmax()
        self.fused_softmax = _fused("masked_softmax")
        self.fused_rope = _fused("rope")
        self.prefix, self.fused = prefix, False

    def fuse_projections(self) -> None:
        """q, k and v as one weight (MindFormers' qkv_concat name w_qkv): no concat of weights on every call."""
        self.w_qkv = fused_linear((self.wq, self.wk, self.wv))
        self.w_qkv.update_parameters_name(self.prefix + "w_qkv.")  # a cell set late gets only its own prefix
        self.fused = True

    def rope_table(self, cos, sin):
        """cos, sin [B|1, S, 1, D] -> this layer's tables [B|1, S, heads + 2 * kv_heads, D] (see the class):
        cos * (1/sqrt(D) | 1 | 0) + (0 | 0 | 1) and sin * (1/sqrt(D) | 1 | 0) over query | key | value heads."""
        return cos * self.head_scale + self.value_heads, sin * self.head_scale

    def project(self, x, cos, sin):
        """q [B, H, S, D] (scaled by 1/sqrt(D)) and k, v [B, KV, S, D] of x [N, hidden], RoPE applied to q and k;
        cos, sin are rope_table()'s [B|1, S, heads, D]."""
        s, d = cos.shape[1], self.head_dim
        b = x.shape[0] // s
        heads = self.n_heads + 2 * self.n_kv_heads
        x = self.copy_in(x)
        flat = self.w_qkv(x) if self.fused else joint_projection(x, (self.wq, self.wk, self.wv))
        if self.fused_rope is not None:
            roped = self.fused_rope(ops.reshape(flat, (b, s, heads, d)), cos, sin)
        else:
            rotated = ops.matmul(ops.reshape(flat, (-1, d)), self.rotate)
            roped = ops.reshape(flat, (b, s, heads, d)) * cos + ops.reshape(rotated, (b, s, heads, d)) * sin
        q, k, v = self.split_heads(_swap_heads_and_positions(roped))
        return q, k, v

    def full_bias(self, bias, batch: int):
        """The attention bias [1, 1, Sq, Sk] at the scores' shape [batch, KV, rep, Sq, Sk], for every layer at once:
        a broadcasting Add per layer costs more than one Tile once (the fused softmax reads the bias as it is)."""
        bias = ops.expand_dims(bias, 2)
        rows = batch * self.n_kv_heads * self.n_rep * bias.shape[3]
        if self.fused_softmax is not None or not large(rows, bias.shape[4]):
            return bias
        return ops.tile(bias, (batch, self.n_kv_heads, self.n_rep, 1, 1))

    def attend(self, q, k, v, bias):
        """Output projection [N, hidden] of softmax(q k^T + bias) v; q [B, H, Sq, D] (scaled), k, v [B, KV, Sk, D],
        bias [B|1, 1, 1, Sq, Sk] (full_bias()'s or a decode step's). Query heads sharing a key head are stacked along
        the rows, so keys are not repeated."""
        b, _, sq, d = q.shape
        sk = k.shape[2]
        grouped = ops.reshape(q, (b, self.n_kv_heads, self.n_rep * sq, d))
        scores = ops.reshape(self.scores(grouped, k), (b, self.n_kv_heads, self.n_rep, sq, sk))
        probs = self.softmax(scores + bias) if self.fused_softmax is None else self.fused_softmax(scores, bias)
        out = self.weighted(ops.reshape(probs, (b, self.n_kv_heads, self.n_rep * sq, sk)), v)
        out = _swap_heads_and_positions(ops.reshape(out, (b, self.n_heads, sq, d)))
        return self.reduce(self.wo(ops.reshape(out, (b * sq, self.n_heads * d))))

    def construct(self, x, cos, sin, bias):
        q, k, v = self.project(x, cos, sin)
        return self.attend(q, k, v, bias), k, v


class FeedForward(nn.Cell):
    """SwiGLU; split by model parallelism: w1/w3 by output rows, w2 by input columns."""

    def __init__(self, cfg: QwenConfig, dtype, parallel: ModelParallel, prefix: str):
        super().__init__()
        split_in = _split(parallel, [prefix + "w1.weight", prefix + "w3.weight"], (None, 0)) is not None
        split_out = _split(parallel, [prefix + "w2.weight"], (None, 1)) is not None
        if split_in != split_out:
            raise UserError(f"the strategy splits {prefix}w1/w3 and {prefix}w2 inconsistently",
                            hint="w1/w3 split on dimension 0 go with w2 split on dimension 1")
        self.inner = cfg.intermediate_size // (parallel.size if split_in else 1)
        self.w1 = Linear(cfg.hidden_size, self.inner, False, dtype)
        self.w2 = Linear(self.inner, cfg.hidden_size, False, dtype)
        self.w3 = Linear(cfg.hidden_size, self.inner, False, dtype)
        self.split_gate_up = Split((self.inner, self.inner), 1)
        self.copy_in = parallel.copy_in() if split_in else Identity()
        self.reduce = parallel.reduce_out() if split_in else Identity()
        self.fused_swiglu = _fused("swiglu")
        self.prefix, self.fused = prefix, False

    def fuse_projections(self) -> None:
        """w1 and w3 as one weight (MindFormers' name w_gate_hidden): no concat of weights on every call."""
        self.w_gate_hidden = fused_linear((self.w1, self.w3))
        self.w_gate_hidden.update_parameters_name(self.prefix + "w_gate_hidden.")  # a cell set late: own prefix only
        self.fused = True

    def construct(self, x):
        x = self.copy_in(x)
        if self.fused:
            gate, up = self.split_gate_up(self.w_gate_hidden(x))
        elif x.shape[0] > self.w1.n_in:
            # more tokens than features (training): two MatMuls, no strided Split of a joint output and Concat back
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = self.split_gate_up(joint_projection(x, (self.w1, self.w3)))
        hidden = silu(gate) * up if self.fused_swiglu is None else self.fused_swiglu(gate, up)
        return self.reduce(self.w2(hidden))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: QwenConfig, dtype, parallel: ModelParallel, index: int):
        super().__init__()
        # attribute order gives MindFormers' parameter order
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attention = Attention(cfg, dtype, parallel, f"model.layers.{index}.attention.")
        self.feed_forward = FeedForward(cfg, dtype, parallel, f"model.layers.{index}.feed_forward.")

    def construct(self, x, cos, sin, bias):
        """x [N, hidden] -> (x, k, v) with the layer's roped keys and values [B, KV, S, D]."""
        a, k, v = self.attention(self.attention_norm(x), cos, sin, bias)
        return self.after_attention(x, a), k, v

    def after_attention(self, x, a):
        """The residual of the attention output a, then the feed-forward block and its residual."""
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x))

    def decode(self, x, cos, sin, bias, write, key_cache, value_cache):
        """One new token per row x [B, hidden]; write [B, 1, S, 1] marks its cache slot; caches [B, KV, S, D]."""
        q, k, v = self.attention.project(self.attention_norm(x), cos, sin)
        key_cache = ops.where(write, k, key_cache)
        value_cache = ops.where(write, v, value_cache)
        return self.after_attention(x, self.attention.attend(q, key_cache, value_cache, bias)), key_cache, value_cache


class QwenModel(nn.Cell):
    def __init__(self, cfg: QwenConfig, dtype, parallel: ModelParallel):
        super().__init__()
        self.num_layers = cfg.num_layers
        self.hidden_size = cfg.hidden_size
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, parallel)
        self.layers = nn.CellList([DecoderLayer(cfg, dtype, parallel, i) for i in range(cfg.num_layers)])
        self.norm_out = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        d = cfg.head_dim
        inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
        self.inv_freq = Tensor(inv_freq.astype(np.float32))

    def rope(self, positions, batch: int | None = None):
        """The layers' RoPE tables (Attention.rope_table) for float32 positions [B|1, S]; shared positions [1, S]
        repeated to `batch` rows: MindSpore's CPU Mul is about 4x slower when it broadcasts, and every layer
        multiplies by them twice."""
        freqs = ops.expand_dims(positions, -1) * self.inv_freq
        emb = ops.expand_dims(ops.concat((freqs, freqs), -1), 2)
        cos, sin = self.layers[0].attention.rope_table(ops.cos(emb), ops.sin(emb))
        if batch is None or batch == cos.shape[0]:
            return cos, sin
        return ops.tile(cos, (batch, 1, 1, 1)), ops.tile(sin, (batch, 1, 1, 1))

    def _causal(self, s):
        positions = ops.cast(ops.arange(s), F32)
        future = ops.cast(ops.expand_dims(positions, 0) > ops.expand_dims(positions, 1), F32)
        return ops.expand_dims(positions, 0), ops.reshape(future * MASKED, (1, 1, s, s))

    def _whole_sequence(self, input_ids):
        """RoPE tables and the causal bias (at the scores' shape) of input_ids [B, S] from position 0."""
        positions, bias = self._causal(input_ids.shape[1])
        # the fused RoPE reads one table for every row of the batch: no copy per row
        fused_rope = self.layers[0].attention.fused_rope is not None
        cos, sin = self.rope(positions, None if fused_rope else input_ids.shape[0])
        return cos, sin, self.layers[0].attention.full_bias(bias, input_ids.shape[0])

    def embed(self, input_ids, table=None):
        """The tokens as rows [B * S, hidden] (from `table`, the embedding's table() already read, when given)."""
        return self.tok_embeddings(ops.reshape(input_ids, (-1,)), table)

    def run(self, input_ids, table=None):
        """Hidden states before the final norm [B, S, hidden] and per-layer keys/values [L, B, KV, S, D]."""
        cos, sin, bias = self._whole_sequence(input_ids)
        x = self.embed(input_ids, table)
        keys, values = (), ()
        for layer in self.layers:
            x, k, v = layer(x, cos, sin, bias)
            keys += (k,)
            values += (v,)
        return ops.reshape(x, input_ids.shape + (self.hidden_size,)), ops.stack(keys), ops.stack(values)

    def construct(self, input_ids):
        cos, sin, bias = self._whole_sequence(input_ids)
        x = self.embed(input_ids)
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, bias)
        return ops.reshape(self.norm_out(x), input_ids.shape + (self.hidden_size,))

    def decode(self, input_ids, batch_valid_length, key_cache, value_cache):
        """Hidden state of the new token [B, hidden] and the caches with its keys/values written."""
        pos = ops.cast(batch_valid_length, ms.int32) - 1
        slots = ops.expand_dims(ops.arange(key_cache.shape[3], dtype=ms.int32), 0)
        write = ops.reshape(slots == ops.expand_dims(pos, 1), (pos.shape[0], 1, -1, 1))
        visible = ops.cast(slots <= ops.expand_dims(pos, 1), F32)
        bias = ops.reshape((1.0 - visible) * MASKED, (pos.shape[0], 1, 1, 1, -1))
        cos, sin = self.rope(ops.expand_dims(ops.cast(pos, F32), 1))
        x = self.embed(input_ids)
        keys, values = (), ()
        for i in range(self.num_layers):
            x, k, v = self.layers[i].decode(x, cos, sin, bias, write, key_cache[i], value_cache[i])
            keys += (k,)
            values += (v,)
        return self.norm_out(x), ops.stack(keys), ops.stack(values)


class QwenForCausalLM(nn.Cell):
    """Qwen1.5 causal LM: construct(input_ids int32 [B, S]) -> logits float32 [B, S, vocab].

    With a model-parallel `parallel`, the process holds its slices (the strategy's layout) and, when the vocabulary
    is split (vocab_emb_dp false), returns its slice of the logits [B, S, vocab / model_parallel].
    """

    def __init__(self, cfg: QwenConfig, parallel: ModelParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.parallel = parallel = parallel or ModelParallel()
        dtype = MS_DTYPES[cfg.param_dtype]
        self.model = QwenModel(cfg, dtype, parallel)
        self.tied = cfg.tie_word_embeddings
        head = EMBEDDING if self.tied else "lm_head.weight"
        self.vocab_parallel = _split(parallel, [head], (None, 0)) is not None
        self.vocab_size = cfg.vocab_size // parallel.size if self.vocab_parallel else cfg.vocab_size
        if not self.tied:
            self.lm_head = Linear(cfg.hidden_size, self.vocab_size, False, dtype)
        self.copy_in = parallel.copy_in() if self.vocab_parallel else Identity()
        self.matmul = ops.MatMul(transpose_b=True)

    def logits(self, hidden, table=None):
        """hidden [..., hidden_size] (after the final norm) -> logits [..., vocab] (this process's slice); `table`:
        the embedding's table() already read, which a tied model projects onto."""
        shared = self.copy_in(hidden)
        if self.tied:
            table = self.model.tok_embeddings.table() if table is None else table
            flat = self.matmul(ops.reshape(shared, (-1, shared.shape[-1])), table)
            return ops.reshape(flat, shared.shape[:-1] + (self.vocab_size,))
        return self.lm_head(shared)

    def construct(self, input_ids):
        return self.logits(self.model(input_ids))

    def fuse_projections(self) -> None:
        """Every layer reads q|k|v and w1|w3 as one weight each, as the exported graphs do, with MindSpore's own
        kernels only (MindSpore Lite cannot run the fused ones). For export only: wq, wk, wv, w1 and w3 are emptied."""
        for layer in self.model.layers:
            layer.attention.fuse_projections()
            layer.feed_forward.fuse_projections()
        use_composed_kernels(self)


class PrefillCell(nn.Cell):
    """construct(input_ids int32 [B, S], batch_valid_length int32 [B]) ->
    (logits [B, vocab] at position batch_valid_length-1, key_cache, value_cache [L, B, KV, S, D]).

    Prompts are right-padded to S; cache slots at and after batch_valid_length hold padding and stay masked.
    """

    def __init__(self, net: QwenForCausalLM, seq_length: int):
        super().__init__(auto_prefix=False)
        self.net = net
        self.seq_length = seq_length

    def construct(self, input_ids, batch_valid_length):
        hidden, keys, values = self.net.model.run(input_ids)
        last = ops.cast(batch_valid_length, ms.int32) - 1
        pick = ops.cast(ops.expand_dims(ops.arange(input_ids.shape[1], dtype=ms.int32), 0)
                        == ops.expand_dims(last, 1), F32)
        hidden = ops.reduce_sum(hidden * ops.expand_dims(pick, -1), 1)
        return self.net.logits(self.net.model.norm_out(hidden)), keys, values


class DecodeCell(nn.Cell):
    """construct(input_ids int32 [B, 1], batch_valid_length int32 [B] counting the new token, key_cache,
    value_cache float32 [L, B, KV, S, D]) -> (logits [B, vocab], key_cache, value_cache).

    The new token's keys/values are written at slot batch_valid_length-1; slots beyond it are masked.
    """

    def __init__(self, net: QwenForCausalLM, seq_length: int):
        super().__init__(auto_prefix=False)
        self.net = net
        self.seq_length = seq_length

    def construct(self, input_ids, batch_valid_length, key_cache, value_cache):
        hidden, keys, values = self.net.model.decode(input_ids, batch_valid_length, key_cache, value_cache)
        return self.net.logits(hidden), keys, values


def cache_shape(cfg: QwenConfig, batch_size: int, seq_length: int) -> tuple[int, ...]:
    """Shape of key_cache and value_cache: [num_layers, batch, n_kv_heads, seq_length, head_dim]."""
    return (cfg.num_layers, batch_size, cfg.n_kv_heads, seq_length, cfg.head_dim)


def set_weights(net: QwenForCausalLM, checkpoint: dict, path) -> None:
    """Set the network's parameters from a loaded checkpoint (`path` names it in errors) strictly, casting to the
    network's parameter dtype; optimizer state is ignored."""
    loaded = {n: p for n, p in checkpoint.items() if not is_beside_weights(n)}
    params = {p.name: p for p in net.get_parameters()}
    check_names({n: p.shape for n, p in params.items()}, {n: p.shape for n, p in loaded.items()}, path)
    for name, param in params.items():
        value = loaded[name]
        param.set_data(value if value.dtype == param.dtype else ops.cast(value, param.dtype))


def greedy_generate(net: QwenForCausalLM, prompt_ids, max_new_tokens: int, eos_ids=()) -> list[int]:
    """Greedy continuation of one prompt without a cache: the new token ids, ending with an eos id if one came.

    The input is padded once to prompt + max_new_tokens so GRAPH mode compiles a single shape.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise UserError("greedy_generate needs a non-empty prompt")
    eos = {int(e) for e in eos_ids}
    ids = np.zeros((1, len(prompt) + max_new_tokens), dtype=np.int32)
    ids[0, :len(prompt)] = prompt
    new = []
    for step in range(max_new_tokens):
        last = len(prompt) + step - 1
        logits = net(Tensor(ids)).asnumpy()
        token = int(np.argmax(logits[0, last]))
        new.append(token)
        if token in eos:
            break
        ids[0, last + 1] = token
    return new
