"""The text decoder's weight contractions at memory bandwidth on XLA:CPU.

XLA:CPU has no bf16 matrix-vector kernel: a contraction of a bf16 weight with a few activation rows first converts
the whole weight to float32, and in a decode step it schedules every layer's conversion up front (a temporary the
size of the model; 0.15 tok/s for E2B). It does fuse the conversion into the loop of a dot whose output is 1-D and
whose vector operand holds at most 2048 float32 values, `dot(x_chunk, W_chunk.T)` with W_chunk a contiguous
[out, chunk] slab (measured in shared/research/xla-cpu-matvec: ~36 GB/s for bf16, level with torch). So on CPU the
matrices are stored once, at load, chunk by chunk: `DecodeWeight.data` n arrays [out, chunk], the stored layout of
`param_spec.Leaf.perm` (contracted axes last, flattened) cut into n column chunks, each a buffer of its own (a
dot on a slice of one stacked array makes XLA copy the slice for the library call); and
- one activation row (batch-1 decode): n 1-D dots, summed; each partial passes `reduce_precision` (a no-op on
  float32) so that XLA does not fuse the dot into the sum, which would undo the fusion above; the row itself is
  written to a float32 buffer of its own first (`_own_buffer`), or XLA fuses its producer (the attention output's
  reshape, a convert) into the loop and recomputes it per weight element (6x slower);
- several rows (batched decode, prefill): per chunk one dot of the stored dtype with a float32 result, which
  XLA:CPU runs natively (YNNPACK) on the chunk as stored.
Quantized weights (int8, int4, GGUF Q8_0/Q4_0, SFP8) keep their codec's bytes and are cut into the same chunks,
their block scales with them. At one row the dequantization (convert, block scale) is elementwise inside the same
fused 1-D dot (int8: ~28 GB/s; 4-bit: two dots per chunk, one per nibble, ~12 GB/s of packed bytes: bound by
the per-element work, not by memory); per-channel and per-tensor scales multiply the result. 4-bit codes with
blocks of 32 (int4, Q4_0) go to the compiled kernel instead where it is built (`kernels`: int8 activations as in
llama.cpp, ~22 GB/s; `DecodeWeight.kernel`). At several rows each
chunk is dequantized into the compute dtype a block at a time just before its native dot (`_dequantized_dots`).
The MoE expert stacks take the same layout with the expert axis leading, so one expert's rows are contiguous in
every chunk: at decode a loop over the (token, expert) rows reads each row's expert alone, a dynamic slice
XLA:CPU reads inside the fused 1-D dot (`DecodeWeight.ragged_einsum`); in prefill a loop takes the rows a tile at
a time, each tile against its expert alone (`_expert_tiles`). XLA:CPU's ragged_dot would convert every expert of
the layer to float32 and multiply every row by every expert. A tied LM head wider than one chunk (26B-A4B, 31B) is
read in column slices, in place. `decode_layout` converts a parameter tree; GPU/TPU keep the checkpoint layout and
their native dots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import kernels, param_spec
from gemma4_jax.config import Gemma4Config

MAX_CHUNK = 2048  # float32 values of the vector operand XLA:CPU still fuses into the matvec loop
_LAYOUT_CLASSES = (param_spec.MATRIX, param_spec.PLE_PROJECTION, param_spec.PLE_GATE)
_SPARE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # for "..." in an equation (the model's equations are lower case)


def chunks_of(n_in: int, span: int = 1) -> int:
    """The number of equal column chunks a contracted length is cut into: the fewest of at most MAX_CHUNK, each a
    whole number of `span`s (a quantization block, in codes); if no such cut exists, chunks of one span each."""
    fits = [n for n in range(1, n_in + 1) if n_in % n == 0 and (n_in // n) % span == 0]
    return next((n for n in fits if n_in // n <= MAX_CHUNK), fits[-1] if fits else 1)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["data", "scales"],
    meta_fields=["shape", "perm", "ncontract", "format", "block", "compute_dtype", "kernel"],
)
@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A weight of logical (official-layout) `shape` stored in column chunks for XLA:CPU (see the module doc):
    `data` = n arrays [out, width], the stored layout (axes `perm`, the last `ncontract` contracted) as [out, in]
    cut into n chunks of columns: the weights themselves, or a quantized weight's codes (`format`, `block` as in
    `quant.QuantizedWeight`, computing in `compute_dtype`) with their `scales`: n arrays [out, blocks of the chunk],
    or one [out] (per channel) or one scalar (SFP8) applied to the result. The bytes are the codec's own: a 4-bit
    chunk keeps ggml's nibble order (low nibble element j of a block, high nibble j + block/2), and the activation
    row is permuted to match instead (`_code_order`). `kernel`: how one activation row meets 4-bit codes with
    blocks of 32: "ffi" the compiled kernel, "jax" its pure-JAX twin (`kernels`; int8 activations, as llama.cpp),
    None XLA's float32 form. A dense expert stack of 16-bit floats holds their bit patterns (uint16, the floats'
    dtype in `compute_dtype`; `expert` gives floats back): a loop over the experts (prefill, `_expert_tiles`) that
    reads a bfloat16 stack makes XLA:CPU convert the whole stack to float32 first."""

    data: Any
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    ncontract: int
    scales: Any = None
    format: str | None = None
    block: int | None = None
    compute_dtype: Any = None
    kernel: str | None = None

    @property
    def dtype(self):
        return self.data[0].dtype if self.compute_dtype is None else self.compute_dtype

    def _floats(self, arrays):
        """Dense `arrays` of this weight as floats (a stack's bit patterns bitcast back; free)."""
        if self.format is None and self.compute_dtype is not None:
            return tuple(jax.lax.bitcast_convert_type(a, self.compute_dtype) for a in arrays)
        return arrays

    @property
    def nbytes(self) -> int:
        arrays = [*self.data, *(jax.tree.leaves(self.scales))]
        return sum(int(a.size * a.dtype.itemsize) for a in arrays)

    def _stored_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm)

    def einsum(self, eqn: str, x):
        """`jnp.einsum(eqn, x, w)` in x's dtype (float32 accumulation)."""
        inputs, out = eqn.split("->")
        lhs, rhs = inputs.split(",")
        if "..." in lhs:
            spare = _SPARE_LETTERS[: x.ndim - (len(lhs) - 3)]
            lhs, out = lhs.replace("...", spare), out.replace("...", spare)
        stored = "".join(rhs[p] for p in self.perm)
        kept, contracted = stored[: len(stored) - self.ncontract], stored[len(stored) - self.ncontract :]
        batch = "".join(c for c in lhs if c not in contracted)
        rows = jnp.einsum(f"{lhs}->{batch}{contracted}", x)  # a transpose, usually the identity
        batch_shape = rows.shape[: len(batch)]
        y = matmul(rows.reshape(math.prod(batch_shape), -1), self)
        y = y.reshape(*batch_shape, *self._stored_shape()[: len(kept)])
        return jnp.einsum(f"{batch}{kept}->{out}", y).astype(x.dtype)

    def ragged_einsum(self, eqn: str, x, group_sizes):
        """`model.ragged_einsum` on a stack of experts (the expert axis leads the stored layout): x [M, ...] rows
        sorted by expert, the first `group_sizes[0]` for expert 0, and so on. Up to GATHER_ROWS rows (decode),
        a loop reads each row's expert alone: its rows of every chunk, a contiguous slice that XLA:CPU reads inside
        the fused 1-D dot (`_rows_by_expert`). More rows (prefill): tiles of rows, each against its expert alone
        (`_expert_tiles`). Rows past the groups give zeros, as ragged_dot's."""
        from gemma4_jax.model import einsum_specs

        lhs, rhs, out = einsum_specs(eqn)
        stored = "".join(rhs[p] for p in self.perm)
        kept, contracted = stored[1 : len(stored) - self.ncontract], stored[len(stored) - self.ncontract :]
        m = x.shape[0]
        rows = jnp.einsum(f"{lhs}->{lhs[0]}{contracted}", x).reshape(m, -1)
        kept_shape = self._stored_shape()[1 : len(stored) - self.ncontract]
        if m > GATHER_ROWS:
            y = _expert_tiles(rows, self, group_sizes)
        else:
            ends = jnp.cumsum(group_sizes)
            expert_of_row = jnp.sum(ends[None, :] <= jnp.arange(m)[:, None], axis=1)
            y = _rows_by_expert(rows, self, expert_of_row)
            y = jnp.where((jnp.arange(m) < ends[-1])[:, None], y, 0)
        y = y.reshape(m, *kept_shape)
        return jnp.einsum(f"{lhs[0]}{kept}->{out}", y).astype(x.dtype)

    @property
    def rows_per_expert(self) -> int:
        """A stack's output rows per expert in each chunk (the expert axis leads the stored layout)."""
        return self.data[0].shape[0] // self._stored_shape()[0]

    def expert(self, e):
        """Expert `e` (a traced index) of a stack whose stored layout leads with the expert axis: the same chunks'
        rows of that expert (dynamic slices, no copy inside a fused dot), one expert's logical shape."""
        out = self.rows_per_expert
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, e * out, out, 0)  # noqa: E731
        if isinstance(self.scales, tuple):
            scales = tuple(map(take, self.scales))
        elif self.scales is not None and self.format != "sfp8":
            scales = take(self.scales)  # per channel [out]
        else:
            scales = self.scales
        axis = self.perm[0]
        perm = tuple(p - (p > axis) for p in self.perm[1:])
        shape = self.shape[:axis] + self.shape[axis + 1 :]
        data = self._floats(tuple(map(take, self.data)))
        compute_dtype = None if self.format is None else self.compute_dtype
        return dataclasses.replace(self, data=data, scales=scales, shape=shape, perm=perm, compute_dtype=compute_dtype)

    def checkpoint_weight(self):
        """The weight as the checkpoint holds it: a dense array (official layout) or a `quant.QuantizedWeight`."""
        data = self._floats(self.data)
        codes = jnp.concatenate(data, axis=1) if len(data) > 1 else data[0]
        if self.format is None:
            return jnp.transpose(codes.reshape(self._stored_shape()), np.argsort(self.perm))
        from gemma4_jax.quant.weight import QuantizedWeight

        rows = self._stored_shape()[: len(self.shape) - self.ncontract]
        if isinstance(self.scales, tuple):
            scales = jnp.concatenate(self.scales, axis=1) if len(self.scales) > 1 else self.scales[0]
        else:
            scales = self.scales
        scales = scales if self.format == "sfp8" else scales.reshape(*rows, -1)
        return QuantizedWeight(
            codes.reshape(*rows, -1), scales, self.format, self.block, self.shape, self.perm, self.ncontract,
            self.compute_dtype,
        )  # fmt: skip

    def materialize(self, dtype):
        weight = self.checkpoint_weight()
        return weight.astype(dtype) if self.format is None else weight.materialize(dtype)

    def reshape(self, *shape):
        """Merges/splits leading uncontracted axes (as `gating.reshape(2F, D)`); the data is unchanged."""
        from gemma4_jax.quant.weight import reshaped_layout

        shape, perm, _, _ = reshaped_layout(self.shape, self.perm, self.ncontract, shape, "decode-layout")
        return dataclasses.replace(self, shape=shape, perm=perm)


def _own_buffer(row):
    """`row` (1-D) as it is, written to a buffer of its own. XLA:CPU fuses cheap producers of a dot's vector operand
    into the matvec loop, and unless that operand is then a plain 1-D array (not a reshape of a [heads, head_dim]
    attention output, a transpose or a convert of one) the loop falls back to a generic emitter that recomputes the
    index arithmetic per weight element: 4.7 instead of 32 GB/s (measured, [1536, 2048] bf16). XLA:CPU never fuses a
    reduce-window into its consumer, so the row goes through one: the running sum of (row, 0), i.e. row + 0."""
    return jax.lax.cumsum(jnp.stack([jnp.zeros_like(row), row]), axis=0)[1]


def _is_4bit(w: DecodeWeight) -> bool:
    return w.format in ("int4", "q4_0")


def _code_order(x, w: DecodeWeight):
    """x [M, IN] with its columns in the order the pieces of `w` read them: as is, or for 4-bit codes (two elements
    per byte, block b: low nibble element j, high nibble j + b/2 of the block) every block's first halves, then
    every block's second halves, so that byte m pairs with column m of each half."""
    if not _is_4bit(w):
        return x
    b = w.block or x.shape[1]
    halves = x.reshape(x.shape[0], -1, 2, b // 2)
    return jnp.concatenate([halves[:, :, 0].reshape(x.shape[0], -1), halves[:, :, 1].reshape(x.shape[0], -1)], 1)


def _pieces(w: DecodeWeight):
    """(column offset in code order, chunk index, nibble) of each dot: one per chunk, two for 4-bit codes."""
    width = w.data[0].shape[1]
    if not _is_4bit(w):
        return [(k * width, k, None) for k in range(len(w.data))]
    half = width * len(w.data)
    return [(nib * half + k * width, k, nib) for nib in (0, 1) for k in range(len(w.data))]


def _piece_weight(w: DecodeWeight, k: int, nibble, rows=slice(None), zero=None):
    """Chunk k (one nibble of it for 4-bit codes; output rows `rows`) as float32 [out, width] with its block scales
    applied; per channel / per tensor scales come after the dot. Elementwise, so XLA:CPU fuses it into the matvec
    loop. `zero` (0.0, added) makes the dequantization wait for whatever produced it (`_wait_for`)."""
    codes = w.data[k][rows]
    if w.format is None:
        q = codes.astype(jnp.float32)
    elif w.format == "sfp8":
        from gemma4_jax.quant.weight import sfp8_decode_jax

        q = sfp8_decode_jax(codes)
    else:
        if nibble is not None:
            codes = ((codes & 0x0F) if nibble == 0 else (codes >> 4)).astype(jnp.int8) - 8
        q = codes.astype(jnp.float32)
    q = q if zero is None else q + zero
    if w.format is None or not isinstance(w.scales, tuple):
        return q
    scales = w.scales[k][rows].astype(jnp.float32)
    out, width = q.shape
    return (q.reshape(out, scales.shape[1], width // scales.shape[1]) * scales[..., None]).reshape(out, width)


def _sum_parts(parts):
    """The chunks' partial products summed; each passes `reduce_precision` (a no-op on float32) so that XLA does
    not fuse a dot into the sum, which would undo its fused 1-D form (module doc)."""
    return parts[0] if len(parts) == 1 else sum(jax.lax.reduce_precision(p, 8, 23) for p in parts)


def _rows_by_expert(rows, w: DecodeWeight, expert_of_row):
    """rows [M, IN] against an expert stack in the decode layout, each row against its own expert -> [M, OUT]
    float32. A loop over the rows, each one the fused 1-D dot of `matmul` on that expert's rows of every chunk (a
    contiguous slice, read in place): as fast as the rows written out one by one (26B-A4B's gating stack, 8 and 32
    rows: 4.6 and 16 ms either way), and compiled once instead of once per row (0.4 s against 1-2 s; written out
    per row, a short tiny_moe prefill compiled in 33 s, against 5 s in the checkpoint layout)."""
    m = rows.shape[0]
    out = w.rows_per_expert

    def one_row(r, y):
        product = matmul(jax.lax.dynamic_slice_in_dim(rows, r, 1, 0), w.expert(expert_of_row[r]))
        return jax.lax.dynamic_update_slice_in_dim(y, product.reshape(1, -1), r, 0)

    return jax.lax.fori_loop(0, m, one_row, jnp.zeros((m, out), jnp.float32))


GATHER_ROWS = 64  # (token, expert) rows up to which an expert stack is read expert by expert (decode batch <= 8)


def _expert_tiles(rows, w: DecodeWeight, group_sizes):
    """rows [M, IN] sorted by group against an expert stack in the decode layout -> [M, OUT] float32, for many
    rows (prefill). Each group's rows are cut into tiles of a fixed number of rows (its last tile partly filled);
    a loop over the tiles in use multiplies each tile by its expert alone through `matmul` (a native dot per chunk,
    quantized experts dequantized just before it), so every expert is read about once per call, in its stored
    dtype. (XLA:CPU's ragged_dot converts the whole stack to float32 and takes the time of multiplying every row by
    every expert: one 26B-A4B layer's gating stack and 512 rows, 12.4 s against 0.16 s here.) A tile's rows past
    its group are another group's or none: its result keeps the values already there for them, and rows past the
    last group stay 0, as ragged_dot's."""
    m = rows.shape[0]
    groups = w._stored_shape()[0]
    tile = int(np.clip(2 ** math.ceil(math.log2(max(1, m / groups))), 8, 128))  # ~ the mean group's rows
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    tiles_per_group = (sizes + tile - 1) // tile
    tile_ends = jnp.cumsum(tiles_per_group)
    # Static bound on the tiles in use: each group adds at most one partly filled tile.
    bound = min(-(-m // tile) + groups, m)
    t = jnp.arange(bound)
    group_of_tile = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right"), groups - 1)
    first_row = (ends - sizes)[group_of_tile] + (t - (tile_ends - tiles_per_group)[group_of_tile]) * tile
    filled = jnp.clip(ends[group_of_tile] - first_row, 0, tile)
    padded = jnp.pad(rows, ((0, tile), (0, 0)))  # a tile starting near the end stays in bounds
    out = w.rows_per_expert

    def one_tile(i, y):
        x = jax.lax.dynamic_slice_in_dim(padded, first_row[i], tile, 0)
        expert = w.expert(group_of_tile[i])
        product = matmul(x, expert)
        kept = jax.lax.dynamic_slice_in_dim(y, first_row[i], tile, 0)
        mine = (jnp.arange(tile) < filled[i])[:, None]
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(mine, product, kept), first_row[i], 0)

    y = jax.lax.fori_loop(0, jnp.minimum(tile_ends[-1], bound), one_tile, jnp.zeros((m + tile, out), jnp.float32))
    return y[:m]


def _is_float16(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


DEQUANTIZED_BLOCK = 1 << 22  # weight elements dequantized at a time for several activation rows (8 MB in bf16)


def _wait_for(y):
    """A float32 zero computed from `y` (one element times 0, which XLA does not fold: not an identity in IEEE
    arithmetic): added to a dequantization, it keeps XLA:CPU from scheduling every block's dequantization at the
    start of the step, a temporary the size of the model in the compute dtype (measured on E2B int8: 2x the
    weight bytes; a zero through an optimization barrier gets folded). An Inf or NaN in that element of `y` makes
    the result NaN, which such an activation already is on its way to."""
    return y.reshape(-1)[0].astype(jnp.float32) * 0.0


def _dequantized_dots(rows, w: DecodeWeight):
    """rows [M, IN] (code order, compute dtype) @ quantized w -> [M, OUT] float32 parts, one per piece: each piece
    dequantized DEQUANTIZED_BLOCK elements at a time into the compute dtype and written out (a dequantization fused
    into the dot's operand is no library call: E2B int8 prefill 4x slower), then XLA:CPU's native dot on it; each
    block waits for the previous dot, so one block is alive at a time."""
    out, width = w.data[0].shape
    step = max(1, DEQUANTIZED_BLOCK // width)
    parts, previous = [], rows
    for c, k, nib in _pieces(w):
        blocks = []
        for start in range(0, out, step):
            block = _piece_weight(w, k, nib, slice(start, start + step), _wait_for(previous)).astype(w.dtype)
            block = jax.lax.optimization_barrier(block)
            previous = jnp.einsum("mi,oi->mo", rows[:, c : c + width], block, preferred_element_type=jnp.float32)
            blocks.append(previous)
        parts.append(blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1))
    return parts


def matmul(x, w: DecodeWeight):
    """x [M, IN] @ w (as [OUT, IN]).T -> [M, OUT] float32, or [OUT] for one row (the fused 1-D form; callers
    reshape). See the module doc."""
    f32 = jnp.float32
    width = w.data[0].shape[1]
    if x.shape[0] == 1 and w.kernel is not None:
        q4 = kernels.q4_matvec if w.kernel == "ffi" else kernels.q4_matvec_reference
        row = x[0].astype(f32)  # in element order: the kernel unpacks the nibbles itself
        parts = [q4(row[2 * width * k : 2 * width * (k + 1)], w.data[k], w.scales[k]) for k in range(len(w.data))]
        return _sum_parts(parts)
    x = _code_order(x, w)
    if x.shape[0] == 1:
        row = _own_buffer(x[0].astype(f32))
        parts = [jnp.dot(row[c : c + width], _piece_weight(w, k, nib).T) for c, k, nib in _pieces(w)]
    elif w.format is None:
        rows = x.astype(w.dtype)
        parts = [
            jnp.einsum("mi,oi->mo", rows[:, c : c + width], w.data[k], preferred_element_type=f32)
            for c, k, _ in _pieces(w)
        ]
    else:
        parts = _dequantized_dots(x.astype(w.dtype), w)
    y = _sum_parts(parts)
    if w.format is not None and not isinstance(w.scales, tuple):  # per channel [out] or per tensor (SFP8)
        y = y * w.scales.astype(f32)
    return y


def as_decode_weight(w) -> DecodeWeight | None:
    """A [out, in] table (the tied embedding) or a `quant.QuantizedWeight` whose contracted codes fit one chunk,
    viewed as a DecodeWeight over the same arrays: one chunk (reshapes only), or for a wider table (26B-A4B, 31B)
    its column slices, which XLA:CPU reads in place inside the fused 1-D dot of one row (traced; a concrete table
    gets copies); None for a wider quantized table or another weight object."""
    from gemma4_jax.quant.weight import QuantizedWeight

    if isinstance(w, QuantizedWeight):
        out, width = math.prod(w.codes.shape[:-1]), w.codes.shape[-1]
        if width > MAX_CHUNK:
            return None
        return DecodeWeight(
            (w.codes.reshape(out, width),), w.shape, w.perm, w.ncontract, _decode_scales(w, out, 1), w.format,
            w.block, w.dtype,
        )  # fmt: skip
    if isinstance(w, jax.Array | np.ndarray) and w.ndim == 2:
        n = chunks_of(w.shape[1])
        width = w.shape[1] // n
        data = (w,) if n == 1 else tuple(w[:, k * width : (k + 1) * width] for k in range(n))
        return DecodeWeight(data, tuple(w.shape), (0, 1), 1)
    return None


def _decode_scales(w, out: int, n: int, split=None):
    """A QuantizedWeight's scales as DecodeWeight.scales for n chunks: block scales [out, blocks] cut into n
    column chunks (with `split`, numpy's, else as the one chunk), per channel [out], per tensor as they are."""
    if w.format == "sfp8":
        return w.scales
    scales = w.scales.reshape(out, -1)
    if w.block is None:
        return scales.reshape(out)
    if n == 1:
        return (scales,)
    return tuple(jnp.asarray(np.ascontiguousarray(part)) for part in split(np.asarray(scales), n, axis=1))


def fused_lm_head(x, table) -> bool:
    """Whether the tied LM head goes through `matmul` here: on XLA:CPU, a 16/32-bit table for one row (the fused
    1-D form, any D), or a quantized table (computing in one) whose D fits one chunk, for any rows (dequantized a
    block at a time instead of whole)."""
    if not wanted(table.dtype):
        return False
    if isinstance(table, jax.Array | np.ndarray):
        return table.ndim == 2 and math.prod(x.shape[:-1]) == 1
    return as_decode_weight(table) is not None


def lm_head(x, table):
    """The tied LM head (`fused_lm_head`): x [..., D] @ table [V, D].T -> [..., V] float32. The table is [out, in]
    already: the decode layout's one chunk without any re-layout."""
    return matmul(x.reshape(-1, x.shape[-1]), as_decode_weight(table)).reshape(*x.shape[:-1], -1)


def uses_decode_layout(leaf: param_spec.Leaf) -> bool:
    """The leaves stored chunk-major on CPU: the text decoder's contractions, the MoE expert stacks included (their
    expert axis leads the stored layout, so one expert's rows are contiguous in every chunk); not the lookup
    tables."""
    experts_lead = leaf.batch == ("experts",) and leaf.stored_axes[0] == "experts"
    return (
        leaf.part == "text"
        and leaf.quant in _LAYOUT_CLASSES
        and (not leaf.batch or experts_lead)
        and leaf.ncontract
        and not leaf.unused
    )


def data_shape(leaf: param_spec.Leaf) -> tuple[int, int, int]:
    """(n, out, chunk): a dense leaf's DecodeWeight data is n arrays [out, chunk]."""
    stored = [leaf.shape[p] for p in leaf.perm]
    n_in = math.prod(stored[len(stored) - leaf.ncontract :])
    n = chunks_of(n_in)
    return n, math.prod(stored) // n_in, n_in // n


def _block_span(w) -> int:
    """Codes per quantization block along a row (1 when the scale does not vary along it)."""
    if w.format == "sfp8" or w.block is None:
        return 1
    return w.block // 2 if w.format in ("int4", "q4_0") else w.block


def quantized_chunks(w) -> tuple[int, int, int]:
    """(out, codes per row, n chunks) of a `quant.QuantizedWeight` in the decode layout."""
    out, width = math.prod(w.codes.shape[:-1]), w.codes.shape[-1]
    return out, width, chunks_of(width, _block_span(w))


def kernel_for(fmt: str | None, block: int | None, scales_dtype) -> str | None:
    """`DecodeWeight.kernel` for quantized weights of `fmt` / `block` / block scales of `scales_dtype` here: "ffi"
    where the compiled kernel takes them and runs on this machine, else None."""
    return "ffi" if kernels.q4_fits(fmt, block, scales_dtype) and kernels.q4_available() else None


def to_decode_weight(w, leaf: param_spec.Leaf) -> DecodeWeight:
    """One leaf as a DecodeWeight: a dense array (official layout; numpy in) or a `quant.QuantizedWeight` (its
    codes and scales cut into chunks, bytes unchanged); each chunk's device array built once."""
    from gemma4_jax.quant.weight import QuantizedWeight

    if isinstance(w, QuantizedWeight):
        if tuple(w.perm) != tuple(leaf.perm) or w.ncontract != leaf.ncontract:
            raise ValueError(f"{leaf.name}: the quantized weight's layout is not the parameter spec's")
        out, width, n = quantized_chunks(w)
        codes = np.asarray(jax.device_get(w.codes)).reshape(out, width)
        data = tuple(jnp.asarray(np.ascontiguousarray(c)) for c in np.split(codes, n, axis=1))
        scales = _decode_scales(w, out, n, np.split)
        kernel = kernel_for(w.format, w.block, w.scales.dtype)
        return DecodeWeight(
            data, tuple(w.shape), tuple(w.perm), w.ncontract, scales, w.format, w.block, w.dtype, kernel
        )
    like = abstract_decode_weight(leaf, np.asarray(w).dtype)
    (rows, chunk), n = like.data[0].shape, len(like.data)
    stored = np.transpose(np.asarray(w), leaf.perm).reshape(rows, n * chunk).view(like.data[0].dtype)
    data = tuple(jnp.asarray(np.ascontiguousarray(stored[:, k * chunk : (k + 1) * chunk])) for k in range(n))
    return dataclasses.replace(like, data=data)


def abstract_decode_weight(leaf: param_spec.Leaf, dtype) -> DecodeWeight:
    """What `to_decode_weight` makes of a dense leaf of `dtype`, its arrays as shapes (to compile without weights).
    An expert stack of 16-bit floats holds their bit patterns (see DecodeWeight)."""
    n, rows, chunk = data_shape(leaf)
    bits = leaf.batch == ("experts",) and _is_float16(dtype)
    data = (jax.ShapeDtypeStruct((rows, chunk), np.uint16 if bits else dtype),) * n
    compute_dtype = jnp.dtype(dtype) if bits else None
    return DecodeWeight(data, tuple(leaf.shape), tuple(leaf.perm), leaf.ncontract, compute_dtype=compute_dtype)


def decode_layout(params, config: Gemma4Config):
    """`params` with each dense or quantized leaf that `uses_decode_layout` stored chunk-major, converted leaf by
    leaf (the old array is released before the next one is made). Other weight objects (LoRA) stay as they are."""
    from gemma4_jax.model import is_dense, tree_get, tree_set
    from gemma4_jax.quant.weight import QuantizedWeight

    out = jax.tree_util.tree_map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))
    for leaf in param_spec.param_spec(config):
        if not uses_decode_layout(leaf):
            continue
        try:
            w = tree_get(out, leaf.path)
        except KeyError:
            continue
        if is_dense(w) or isinstance(w, QuantizedWeight):
            tree_set(out, leaf.path, to_decode_weight(w if isinstance(w, QuantizedWeight) else jax.device_get(w), leaf))
            del w
    return out


_FAST_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def wanted(dtype) -> bool:
    """Whether the decode layout pays off for weights of `dtype` here: on XLA:CPU, 16/32-bit floats (float64, the
    parity tests' dtype, keeps the checkpoint layout: the fused form computes in float32)."""
    return jax.default_backend() == "cpu" and jnp.dtype(dtype) in tuple(map(jnp.dtype, _FAST_DTYPES))


def is_decode_weight(x) -> bool:
    return isinstance(x, DecodeWeight)


def checkpoint_layout(params):
    """`params` with every DecodeWeight back in the official layout, quantized ones as `quant.QuantizedWeight`s
    (for what reads or transforms weights as stored: quantization, saving, LoRA training); the tree itself when it
    has none."""
    if not any(is_decode_weight(w) for w in jax.tree.leaves(params, is_leaf=is_decode_weight)):
        return params
    official = lambda w: w.checkpoint_weight() if is_decode_weight(w) else w  # noqa: E731
    return jax.tree.map(official, params, is_leaf=is_decode_weight)
