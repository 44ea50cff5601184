"""Compressed gradient history: ternary codes with per-block scales, optionally bundled (VSA).

Pure tensor functions on the tensors' own device, plus `CompressedHistory`, a ring of the last
`window` gradients per tensor that the predictor reads back as a weighted sum.

- ternary: each gradient is cut into blocks of `block` elements; each element becomes a code in
  {-1, 0, +1} and each block one fp32 scale. Deterministic rounding is the ternary-weight-network
  rule (threshold 0.7 * mean|x|, scale = mean |x| above it); stochastic rounding is unbiased
  (scale = max|x|, P(code = sign x) = |x| / scale), drawn from a generator seeded by
  (seed, step, tensor), so it is reproducible and needs no generator state in checkpoints.
  Codes are packed 4 per byte.
- vsa: ternary codes are bound to seeded random +-1 keys (one key per tensor and position in the
  bundle, made in blocks from a local torch.Generator, never stored) and `bundle` consecutive records are summed
  into one superposition, an integer in [-bundle, bundle] packed 2 per byte. Unbinding (multiply
  by the key again) returns each record plus crosstalk from the others in its bundle.
- int4: each element rounded to the nearest of 15 levels, -7..7 times max|x|/7 of its block, 2 per
  byte. For the AR predictor: its forecast is a weighted sum of the records with weights of either
  sign (c = (2, -1) for a trend), which adds up their rounding noise; read back from ternary records
  it kept 0.67-0.68 of the cosine it has over fp32 records, from int4 records 0.93-1.00 (results/
  gradient_noise_*_8x.json, ar_ternary and ar_int4 against ar).

Error feedback: what rounding lost from a record is carried into the next one (kept as int8 with
a block scale), so the stored records sum to the true ones minus only the newest error, which the
read-back adds back. Without it the same rounding error of similar consecutive gradients adds up
in the weighted sum instead of cancelling.

Bytes per element: ternary window/4, int4 window/2, vsa window/(2*bundle); plus 1 (error) and
4*window/block (scales).
"""
import torch

COMPRESSIONS = ("none", "ternary", "int4", "vsa")
ROUNDINGS = ("deterministic", "stochastic")
_KEY_CHUNK = 1 << 20  # keys are generated this many elements at a time
GRAM_CHUNK = 1 << 22  # a flat history's records are decoded this many elements at a time for the AR fit

_luts = {}


def _lut(device, bits):
    """byte -> its 8/bits signed fields as float32 (2 bits: code-1 in {-1,0,1}; 4 bits: field-8)."""
    key = (str(device), bits)
    if key not in _luts:
        b = torch.arange(256, dtype=torch.int32)
        per, mask, off = 8 // bits, (1 << bits) - 1, 1 if bits == 2 else 8
        _luts[key] = torch.stack([((b >> (bits * k)) & mask) - off for k in range(per)], 1).float().to(device)
    return _luts[key]


def blocks_of(numel: int, block: int) -> int:
    return -(-numel // block)


def packed_bytes(numel: int, block: int, bits: int = 2) -> int:
    """Bytes of one packed record (codes only) for a tensor of `numel` elements."""
    return blocks_of(numel, block) * block * bits // 8


def _blocked(x, block):
    """Flat fp32 view of x padded with zeros to whole blocks: [blocks, block] (a view when it can be)."""
    flat = x.reshape(-1).float()
    pad = blocks_of(flat.numel(), block) * block - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def ternarize(x, block, generator=None):
    """x -> (codes fp32 [blocks, block] in {-1,0,1}, scales fp32 [blocks]); the dequantized value
    is codes * scales[:, None]. generator None: deterministic; else unbiased stochastic rounding."""
    return _ternarize_blocks(_blocked(x, block), generator)[:2]


def _ternarize_blocks(xb, generator=None):
    """ternarize() on blocked fp32 xb, also returning max|x| per block. Written for few passes
    over memory (on CPU each pass costs as much as the arithmetic)."""
    a = xb.abs()
    amax = a.amax(1)
    if generator is None:
        codes = torch.sign(xb).mul_(a > a.mean(1, keepdim=True).mul_(0.7))
        kept = torch.linalg.vecdot(codes, codes).clamp_min_(1)  # count of nonzero codes
        scales = torch.linalg.vecdot(xb, codes).div_(kept)  # mean |x| over the kept elements
    else:
        scales = amax
        u = torch.rand(xb.shape, generator=generator, device=xb.device)
        codes = torch.sign(xb).mul_(u.mul_(scales[:, None]) < a)
    return codes, scales, amax


def quantize_(xb, bound, levels):
    """[blocks, block] fp32 -> (integers in [-levels, levels] as fp32, fp32 scales [blocks]), round
    to nearest, given per-block bounds on |x| (saves a pass over x). Overwrites xb."""
    scales = (bound / levels).clamp_min_(1e-30)
    return xb.div_(scales[:, None]).round_(), scales


def int8_quantize_(xb, bound):
    """[blocks, block] fp32 -> (int8 flat, fp32 [blocks]); see quantize_."""
    q, scales = quantize_(xb, bound, 127)
    return q.to(torch.int8).reshape(-1), scales


def int4_pack(x, block):
    """x -> (packed 4-bit codes uint8, fp32 block scales): each element rounded to the nearest of
    15 levels, -7..7 times max|x|/7 of its block, so |error| <= max|x|/14. x is not modified."""
    xb = _blocked(x, block).clone()  # (_blocked may return a view of x)
    q, scales = quantize_(xb, xb.abs().amax(1), 7)
    return pack(q, 4), scales


def pack(values, bits=2):
    """Signed fields (2 bits: {-1,0,1}; 4 bits: [-7,7]; any dtype) -> uint8, 8/bits per byte."""
    per, off, mask = 8 // bits, 1 if bits == 2 else 8, (1 << bits) - 1
    v = ((values.reshape(-1, per).to(torch.int8).view(torch.uint8) + off) & mask)
    out = v[:, 0].clone()
    for k in range(1, per):
        out |= v[:, k] << (bits * k)
    return out


def ternary_pack(x, block, generator=None):
    """x -> (packed 2-bit codes uint8, fp32 block scales): ternarize, then pack."""
    codes, scales = ternarize(x, block, generator)
    return pack(codes, 2), scales


def unpack(packed, bits=2):
    """uint8 -> float32 fields, flat (inverse of pack)."""
    return torch.nn.functional.embedding(packed.int(), _lut(packed.device, bits)).reshape(-1)


def dequantize(packed, scales, numel, block, bits=2):
    return (unpack(packed, bits).view(-1, block) * scales[:, None]).reshape(-1)[:numel]


def key_signs(numel, block, seed, device):
    """Seeded +-1 key (float32, padded to whole blocks), generated _KEY_CHUNK elements at a time:
    random bytes, each expanded to 8 signs through a table (one draw per 8 elements)."""
    n = blocks_of(numel, block) * block
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = torch.empty(-(-n // 8) * 8, device=device)
    table = _sign_table(device)
    for s in range(0, out.numel(), _KEY_CHUNK):
        m = min(_KEY_CHUNK, out.numel() - s)
        draw = torch.randint(0, 256, (m // 8,), generator=gen, device=device, dtype=torch.uint8)
        torch.index_select(table, 0, draw.int(), out=out[s:s + m].view(-1, 8))
    return out[:n]


def _sign_table(device):
    """byte -> its 8 bits as +-1 float32, [256, 8]."""
    key = (str(device), "signs")
    if key not in _luts:
        b = torch.arange(256, dtype=torch.int32)
        _luts[key] = torch.stack([((b >> k) & 1) * 2 - 1 for k in range(8)], 1).float().to(device)
    return _luts[key]


def mix_seed(*parts) -> int:
    """A 63-bit seed from integers, stable across runs and machines (no hash())."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class CompressedHistory:
    """The last `window` records of each tensor in compressed form, read back as a weighted sum.

    State: per tensor a uint8 code buffer [storage slots, bytes] and fp32 scales [window, blocks];
    on the host, the step of each slot (-1: empty). Kind 'none' keeps the records in fp32
    ([window, blocks * block], no scales, no error feedback), for predictors that need the records
    themselves (the AR fit) without compression."""

    def __init__(self, params, kind="ternary", window=8, block=256, rounding="deterministic", bundle=4, seed=0):
        if kind not in COMPRESSIONS:
            raise ValueError(f"compression kind must be one of {COMPRESSIONS}, got {kind!r}")
        self.params = list(params)
        self.kind, self.window, self.block, self.rounding, self.seed = kind, window, block, rounding, seed
        self.bundle = min(bundle, window) if kind == "vsa" else 1
        self.bits = 4 if kind in ("vsa", "int4") else 2
        self.slots = -(-window // self.bundle)
        dev = self.params[0].device
        # Empty until allocate(): tensors dropped before the first record never cost memory.
        self.codes = [torch.zeros(0, dtype=torch.uint8, device=dev) for _ in self.params]
        self.scales = [torch.zeros(0, device=dev) for _ in self.params]
        self.error = [torch.zeros(0, dtype=torch.int8, device=dev) for _ in self.params]
        self.error_scales = [torch.zeros(0, device=dev) for _ in self.params]
        self.times = [-1] * window
        self.next = 0  # the slot the next record goes to

    def allocate(self, index):
        """Full-size buffers for the tensors in `index` that have none yet."""
        for i in index:
            if not self.codes[i].numel():
                self._allocate_one(i)

    def _allocate_one(self, i):
        n, dev = self.params[i].numel(), self.params[i].device
        if self.kind == "none":
            self.codes[i] = torch.zeros(self.window, blocks_of(n, self.block) * self.block, device=dev)
            return
        self.codes[i] = torch.zeros(self.slots, packed_bytes(n, self.block, self.bits), dtype=torch.uint8,
                                    device=dev)
        self.scales[i] = torch.zeros(self.window, blocks_of(n, self.block), device=dev)
        self.error[i] = torch.zeros(blocks_of(n, self.block) * self.block, dtype=torch.int8, device=dev)
        self.error_scales[i] = torch.zeros(blocks_of(n, self.block), device=dev)

    def _generator(self, *parts):
        gen = torch.Generator(device=self.params[0].device)
        gen.manual_seed(mix_seed(self.seed, *parts))
        return gen

    def _key(self, i, slot):
        return key_signs(self.params[i].numel(), self.block, mix_seed(self.seed, 1, i, slot % self.bundle),
                         self.params[i].device)

    def push(self, grads, t: int, index=None, finite=None):
        """Store the gradients of step t (one per tensor) in the oldest slot (for vsa: a new bundle
        drops the oldest whole bundle); only the tensors in `index` (all: None) are stored. `finite`: a
        0-dim bool; where False, zeros are stored instead (one tensor's copy alive at a time)."""
        k = self.next
        b, first = divmod(k, self.bundle)[0], k % self.bundle == 0
        if first:  # the slots of the bundle being overwritten are gone
            for j in range(b * self.bundle, min((b + 1) * self.bundle, self.window)):
                self.times[j] = -1
        for i in range(len(self.params)) if index is None else index:
            if not self.codes[i].numel():  # the first record of this tensor
                self._allocate_one(i)
            g = grads[i] if finite is None else torch.where(finite, grads[i], 0.0)
            if self.kind == "none":
                self.codes[i][k].zero_()[:g.numel()].copy_(g.reshape(-1))
                continue
            # error feedback: carry what rounding lost from the previous record
            x = self.error[i].view(-1, self.block).float().mul_(self.error_scales[i][:, None])
            x.add_(_blocked(g, self.block))
            # bound: on |x - code * scale| per block, the int8 error's range
            if self.kind == "int4":  # round to nearest: at most half a level
                codes, scales = quantize_(x.clone(), x.abs().amax(1), 7)  # (quantize_ overwrites: x is still needed)
                bound = scales / 2
            else:  # ternary: at most max |x| of the block, for both roundings
                gen = None if self.rounding == "deterministic" else self._generator(0, t, i)
                codes, scales, bound = _ternarize_blocks(x, gen)
            self.scales[i][k] = scales
            error, error_scales = int8_quantize_(x.addcmul_(codes, scales[:, None], value=-1), bound)
            self.error[i].copy_(error)  # (into the buffer: it may be a view of a larger one)
            self.error_scales[i].copy_(error_scales)
            if self.kind != "vsa":
                self.codes[i][k] = pack(codes, self.bits)
            else:
                bound = codes.reshape(-1).mul_(self._key(i, k))
                total = bound if first else bound.add_(unpack(self.codes[i][b], 4))
                self.codes[i][b] = pack(total, 4)
        self.times[k] = t
        self.next = (k + 1) % self.window

    def _error(self, i):
        return self.error[i].view(-1, self.block).float() * self.error_scales[i][:, None]

    def decode(self, i, k):
        """Record in slot k of tensor i as a flat fp32 tensor of blocks * block elements (zero padded):
        what weighted_sum reads for it (for vsa: unbound from its bundle, with the others' crosstalk)."""
        return self.weighted_sum({k: 1.0}, [i], padded=True)[0]

    def records(self, i, slots, at=None, rows=None):
        """[len(slots), blocks * block] the records of tensor i in `slots`, each as decode() reads it,
        decoded together (one unpack per tensor, not one per record: the AR fit reads them all at
        every refit, and on a model of a few hundred tensors the per-record calls cost more than
        the arithmetic). `at`: `slots` as an index tensor on the tensor's device, if the caller has one.
        `rows`: (first, end) block range to decode (default: all blocks)."""
        b0, b1 = rows or (0, blocks_of(self.params[i].numel(), self.block))
        if self.kind == "vsa":  # unbinding reads each record's bundle and key
            return torch.stack([self.decode(i, k) for k in slots])[:, b0 * self.block:b1 * self.block]
        if at is None or at.device != self.codes[i].device:
            at = torch.tensor(slots, device=self.codes[i].device)
        if self.kind == "none":
            return self.codes[i][at][:, b0 * self.block:b1 * self.block]
        per = self.block * self.bits // 8  # bytes per block
        r = (unpack(self.codes[i][at][:, b0 * per:b1 * per], self.bits).view(len(slots), -1, self.block)
             * self.scales[i][at][:, b0:b1, None])
        newest = (self.next - 1) % self.window
        if newest in slots:  # the newest record's rounding error, not yet carried (as weighted_sum adds it)
            r[slots.index(newest)] += self._error(i)[b0:b1]
        return r.view(len(slots), -1)

    def gram(self, index, slots, groups=None):
        """[len(index), n, n] float64 inner products of each tensor's records in `slots` (order kept).
        One tensor's n records are decoded at a time: peak memory n times the largest tensor.
        `groups` ([the group of each block of each tensor], number of groups), for chunks of one flat
        tensor: the inner products per group of their blocks instead, [groups, n, n], decoded GRAM_CHUNK
        elements at a time (a few ops per chunk, whatever the number of groups)."""
        out, slots = [], list(slots)
        at = torch.tensor(slots, device=self.params[0].device)  # one index copy for all tensors, not one each
        if groups is not None:
            owners, n_groups = groups
            n = len(slots)
            total = torch.zeros(n_groups, n, n, dtype=torch.float64, device=self.params[0].device)
            step = max(1, GRAM_CHUNK // self.block)
            for i in index:
                blocks = blocks_of(self.params[i].numel(), self.block)
                for b0 in range(0, blocks, step):
                    b1 = min(blocks, b0 + step)
                    r = self.records(i, slots, at, (b0, b1)).view(n, b1 - b0, self.block)
                    per_block = torch.einsum("jbk,lbk->bjl", r, r).double()  # [blocks, n, n]
                    total.index_add_(0, owners[i][b0:b1], per_block)
            return total
        for i in index:
            r = self.records(i, slots, at)
            out.append((r @ r.T).double())
        return torch.stack(out)

    def filled(self):
        return [(k, t) for k, t in enumerate(self.times) if t >= 0]

    def weighted_sum(self, weights, index=None, padded=False, into=None):
        """sum_k weights[k] * record_k for the tensors in `index` (all: None); weights by slot, each
        a host float, a 1-D device tensor with one weight per tensor of `index` (per-tensor
        weights, the AR forecast's), or a list of per-block weights [blocks], one per tensor of `index`
        (a flat history's groups). Fresh fp32 tensors shaped like the parameters (padded: flat,
        blocks * block elements), or written into `into` (fp32 tensors of blocks * block elements). vsa: each bundle is unpacked once, and each key once, since slots
        at the same position in their bundles share a key: sum_j key_j * (sum_b w_bj * scale_bj * bundle_b)."""
        newest = (self.next - 1) % self.window
        slots = sorted((k, w) for k, w in weights.items() if isinstance(w, torch.Tensor) or w)
        by_position = {}  # vsa: position in bundle -> [(slot, weight)]
        for k, w in slots:
            by_position.setdefault(k % self.bundle, []).append((k, w))
        out = []
        for n, i in enumerate(range(len(self.params)) if index is None else index):
            p = self.params[i]
            # this tensor's weight: a host float, a 0-dim tensor, or [blocks] (per block: a flat history's groups)
            w_of = lambda w: w[n].reshape(-1, 1) if isinstance(w, (torch.Tensor, list)) else w  # noqa: E731
            if into is None:
                acc = torch.zeros(blocks_of(p.numel(), self.block), self.block, device=p.device)
            else:
                acc = into[n].view(-1, self.block).zero_()
            if self.kind == "none":
                for k, w in slots:
                    acc.add_(self.codes[i][k].view(-1, self.block) * w_of(w))
            elif self.kind != "vsa":  # ternary, int4
                for k, w in slots:
                    acc.addcmul_(unpack(self.codes[i][k], self.bits).view(-1, self.block),
                                 self.scales[i][k][:, None] * w_of(w))
            else:
                bundles = {}
                for j, at_j in sorted(by_position.items()):
                    part = torch.zeros_like(acc)
                    for k, w in at_j:
                        b = k // self.bundle
                        if b not in bundles:
                            bundles[b] = unpack(self.codes[i][b], 4).view(-1, self.block)
                        part.addcmul_(bundles[b], self.scales[i][k][:, None] * w_of(w))
                    acc.addcmul_(part, self._key(i, j).view(-1, self.block))
            w_new = weights.get(newest, 0.0)
            if self.kind != "none" and (isinstance(w_new, torch.Tensor) or w_new):
                acc.add_(self._error(i) * w_of(w_new))  # the newest record's rounding error, not yet carried
            out.append(acc.reshape(-1) if padded else acc.reshape(-1)[:p.numel()].view_as(p))
        return out

    # ---- state -----------------------------------------------------------------------------
    BUFFERS = ("codes", "scales", "error", "error_scales")  # per-tensor lists

    def tensors(self) -> dict:
        s = {}
        for name in self.BUFFERS:
            for i, x in enumerate(getattr(self, name)):
                s[f"{name}.{i}"] = x
        return s

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.tensors().values())
