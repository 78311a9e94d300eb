"""Inputs for ``toile.tools.fuzz``: valid seed files, and seeded mutators that break them.

Every mutator is ``(rng, data) -> bytes`` and deterministic given ``rng``; a case is rebuilt
from ``(seed, kind, index)`` alone. Mutators know the formats well enough to reach past the
first check of a parser: header lengths, chunk CRCs and IFD offsets are kept consistent where
the point is to test what lies behind them.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from collections.abc import Callable
from functools import cache
from typing import Any

Mutator = Callable[[random.Random, bytes], bytes]

# Values that break parsers: boundaries of the integer types, nonsense types, huge strings.
NASTY_INTS = (
    0, 1, -1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53,
    2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63), 8192, 8193, 4096, 100_000,
)
NASTY_JSON: tuple[Any, ...] = (
    None, True, False, 0, -1, 2**64, 1e308, -1e308, 0.5, "", "x", "\u0000", "é🙂",
    [], {}, [1, 2], {"a": 1}, "x" * 5000, [None], {"": None}, "@@DEEP@@", "@@NAN@@",
)
DEEP = 100_000  # nesting depth of a "@@DEEP@@" value: past every JSON parser's recursion limit


def dump_json(value: Any, rng: random.Random) -> str:
    """JSON text of ``value``, with the ``@@DEEP@@``/``@@NAN@@`` markers made into deeply
    nested arrays / NaN (which json.dumps cannot write from Python values)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=rng.random() < 0.5)
    depth = rng.choice((200, 1000, DEEP))
    return text.replace('"@@DEEP@@"', "[" * depth + "]" * depth).replace('"@@NAN@@"', "NaN")


def mutate_json_value(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with one node (chosen at random, walking down) replaced or changed."""
    if isinstance(value, dict) and value and depth < 6 and rng.random() < 0.75:
        key = rng.choice(list(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.12:
            del out[key]
        elif roll < 0.2:
            out[rng.choice(("", "x" * 300, "__metadata__", "é", key + "_"))] = rng.choice(
                NASTY_JSON)
        else:
            out[key] = mutate_json_value(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and depth < 6 and rng.random() < 0.75:
        out_list = list(value)
        i = rng.randrange(len(out_list))
        roll = rng.random()
        if roll < 0.15:
            del out_list[i]
        elif roll < 0.25:
            out_list.append(rng.choice(NASTY_JSON))
        else:
            out_list[i] = mutate_json_value(rng, value[i], depth + 1)
        return out_list
    if isinstance(value, bool) or value is None:
        return rng.choice(NASTY_JSON)
    if isinstance(value, int):
        return rng.choice((*NASTY_INTS, -value, value + 1, str(value), float(value)))
    if isinstance(value, float):
        return rng.choice((*NASTY_INTS, "@@NAN@@", -value, 1e308, str(value)))
    return rng.choice(NASTY_JSON)


# ---------------------------------------------------------------------------------------------
# generic byte mutators


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    span = min(len(out), 512) if rng.random() < 0.5 else len(out)  # headers half the time
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    span = min(len(out), 256) if rng.random() < 0.6 else len(out)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(span)] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    if len(data) < 2:
        return b""
    cut = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(min(len(data), 300))
    return data[:cut]


def delete_range(rng: random.Random, data: bytes) -> bytes:
    if len(data) < 2:
        return data
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 64):]


def duplicate_range(rng: random.Random, data: bytes) -> bytes:
    if len(data) < 2:
        return data
    start = rng.randrange(len(data))
    piece = data[start:start + rng.randint(1, 256)]
    at = rng.randrange(len(data))
    return data[:at] + piece * rng.choice((1, 2, 10, 200)) + data[at:]


def insert_random(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]


def append_garbage(rng: random.Random, data: bytes) -> bytes:
    return data + rng.randbytes(rng.randint(1, 4096))


def random_bytes(rng: random.Random, data: bytes) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 7, 8, 9, 16, 100, 5000)))


GENERIC: tuple[Mutator, ...] = (
    flip_bits, set_bytes, truncate, delete_range, duplicate_range, insert_random,
    append_garbage,
)


# ---------------------------------------------------------------------------------------------
# safetensors


def split_safetensors(data: bytes) -> tuple[Any, bytes] | None:
    """(header JSON, data section) of a well-formed file; None when the header does not parse."""
    if len(data) < 8:
        return None
    (size,) = struct.unpack("<Q", data[:8])
    try:
        return json.loads(data[8:8 + size]), data[8 + size:]
    except (ValueError, RecursionError):
        return None


def join_safetensors(header_text: str | bytes, body: bytes, rng: random.Random) -> bytes:
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    if rng.random() < 0.7:
        raw += b" " * (-len(raw) % 8)  # safetensors writers pad the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + body


def _tensor_names(header: Any) -> list[str]:
    return [k for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else []


DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64",
          "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64", "XX", "", "f32")


def st_header_mutation(rng: random.Random, data: bytes) -> bytes:
    """Change one tensor entry (dtype, shape, offsets) or the metadata, rewrite the header."""
    parsed = split_safetensors(data)
    if parsed is None or not isinstance(parsed[0], dict):
        return flip_bits(rng, data)
    header, body = parsed
    names = _tensor_names(header)
    roll = rng.random()
    if names and roll < 0.6:
        name = rng.choice(names)
        entry = dict(header[name]) if isinstance(header[name], dict) else {}
        field = rng.choice(("dtype", "shape", "data_offsets", "entry", "rename"))
        if field == "dtype":
            entry["dtype"] = rng.choice((*DTYPES, 5, None, ["F32"]))
        elif field == "shape":
            entry["shape"] = rng.choice((
                [2**31, 2**31], [2**64 - 1], [-1, 4], [0], [], [1] * 2000,
                [rng.randint(0, 64) for _ in range(rng.randint(0, 5))], "4", [[1]], [1.5],
                [2**32, 2**32, 2**32], [3, 3],
            ))
        elif field == "data_offsets":
            end = len(body)
            begin, stop = (entry.get("data_offsets") or [0, 0])[:2] if isinstance(
                entry.get("data_offsets"), list) else (0, 0)
            entry["data_offsets"] = rng.choice((
                [0, end + rng.randint(1, 10**6)], [stop, begin], [-1, 4], [0, 2**64 - 1],
                [2**64, 2**64 + 4], [0], [0, 4, 8], [0.5, 4], ["0", "4"], [0, 0],
                [begin, stop + 4], [max(begin - 4, 0), stop], [0, end], None,
            ))
        elif field == "entry":
            header[name] = rng.choice((5, "x", None, [], {}, {"dtype": "F32"}))
            return join_safetensors(dump_json(header, rng), body, rng)
        else:
            header[rng.choice(("", "x" * 5000, "é/🙂", name + "\u0000", "unet", "unet."))] = (
                header.pop(name))
            return join_safetensors(dump_json(header, rng), body, rng)
        header[name] = entry
    elif roll < 0.75 and names:
        header.pop(rng.choice(names))  # a hole in the data section
    else:
        header = mutate_json_value(rng, header)
    return join_safetensors(dump_json(header, rng), body, rng)


LORA_METADATA_KEYS = (
    "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora",
    "lora_bias", "init_lora_weights", "fan_in_fan_out", "bias", "use_rslora", "peft_type",
)


def st_metadata_mutation(rng: random.Random, data: bytes) -> bytes:
    """Change the ``__metadata__`` strings toile and diffusers read: ``toile.*`` (JSON values)
    and ``lora_adapter_metadata`` (the adapter's LoraConfig as JSON)."""
    parsed = split_safetensors(data)
    if parsed is None or not isinstance(parsed[0], dict):
        return set_bytes(rng, data)
    header, body = parsed
    meta = header.get("__metadata__")
    meta = dict(meta) if isinstance(meta, dict) else {}
    roll = rng.random()
    if roll < 0.35 and isinstance(meta.get("lora_adapter_metadata"), str):
        try:
            adapters = json.loads(meta["lora_adapter_metadata"])
        except (ValueError, RecursionError):
            adapters = {}
        if isinstance(adapters, dict) and adapters and rng.random() < 0.6:
            prefix = rng.choice(sorted({k.split(".")[0] for k in adapters}) or ["unet"])
            key = f"{prefix}.{rng.choice(LORA_METADATA_KEYS)}"
            adapters[key] = rng.choice((
                *NASTY_JSON, 10**7, 10**9, 0, -4, 1, 64, ["nonexistent"], "all-linear",
                {"x": 10**6}, {"to_q": 10**6},
            ))
        else:
            adapters = mutate_json_value(rng, adapters)
        meta["lora_adapter_metadata"] = dump_json(adapters, rng)
    elif roll < 0.55:
        meta["lora_adapter_metadata"] = rng.choice((
            "", "{", "[]", "5", "null", '"x"', "[" * 5000 + "]" * 5000, '{"unet.r": "x"}',
            '{"unet.r": 1e999}', "NaN", '{"x": {}}',
        ))
    elif roll < 0.85:
        key = "toile." + rng.choice(("family", "base_model", "rank", "steps", "prompt", "method",
                                     "lr", "version", "x"))
        meta[key] = rng.choice((
            "", "{", '"sd"', '"toile"', "5", "null", "[" * 5000 + "]" * 5000, "1e999",
            "NaN", '{"a": 1}', "x" * 100_000, '"\\ud800"', dump_json(rng.choice(NASTY_JSON), rng),
        ))
    else:
        header["__metadata__"] = rng.choice((
            5, "x", [], None, {"format": 5}, {"toile.family": {"a": 1}}, {"": ""},
            {"lora_adapter_metadata": None},
        ))
        return join_safetensors(dump_json(header, rng), body, rng)
    header["__metadata__"] = meta
    return join_safetensors(dump_json(header, rng), body, rng)


def st_length_field(rng: random.Random, data: bytes) -> bytes:
    """The 8-byte header length: too large, negative as signed, zero, or off by a little."""
    if len(data) < 8:
        return data
    (size,) = struct.unpack("<Q", data[:8])
    new = rng.choice((0, 1, 2, size - 1, size + 1, size + 8, len(data), len(data) - 7,
                      2**31, 2**32 + size, 2**63, 2**64 - 1, 2**64 - size, 100 * 2**20,
                      rng.randrange(2**64)))
    return struct.pack("<Q", new % 2**64) + data[8:]


def st_header_text(rng: random.Random, data: bytes) -> bytes:
    """A header that is not a JSON object of tensors: other JSON, bad UTF-8, deep nesting,
    duplicate keys, huge padding."""
    parsed = split_safetensors(data)
    body = parsed[1] if parsed else data[8:]
    choice = rng.randrange(9)
    if choice == 0:
        text: str | bytes = rng.choice(("[]", "5", '"x"', "null", "true", "{", "", "{}"))
    elif choice == 1:
        depth = rng.choice((100, 129, 1000, DEEP))
        text = '{"a":' + "[" * depth + "]" * depth + "}"
    elif choice == 2:
        text = b'{"a\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    elif choice == 3:
        entry = '{"dtype":"U8","shape":[4],"data_offsets":[0,4]}'
        text = '{"t":' + entry + ',"t":' + entry + "}"
    elif choice == 4 and parsed:
        text = json.dumps(parsed[0]) + " " * rng.choice((10**5, 10**6, 10**7))
    elif choice == 5 and parsed:
        text = json.dumps(parsed[0])[: rng.randrange(1, max(2, len(json.dumps(parsed[0]))))]
    elif choice == 6:
        # many tiny tensors (every loader is linear in them: 10k takes a second, not a hang)
        count = rng.choice((1000, 10_000))
        entries = ",".join(
            f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}'
            for i in range(count))
        return join_safetensors("{" + entries + "}", b"\0" * count, rng)
    elif choice == 7:
        dims = ",".join(["1"] * 10_000)
        text = '{"t":{"dtype":"U8","shape":[' + dims + '],"data_offsets":[0,1]}}'
        body = b"\0"
    else:
        text = '{"__metadata__":{"' + "k" * 10 + '":' + json.dumps("v" * 10**6) + "}}"
    return join_safetensors(text, body, rng)


def st_body(rng: random.Random, data: bytes) -> bytes:
    """Bytes of the data section: NaN/inf patterns, random noise, trimmed or grown."""
    parsed = split_safetensors(data)
    if parsed is None:
        return flip_bits(rng, data)
    header_len = len(data) - len(parsed[1])
    body = bytearray(parsed[1])
    roll = rng.random()
    if roll < 0.4 and body:
        for _ in range(rng.randint(1, 32)):
            i = rng.randrange(len(body))
            body[i:i + 4] = rng.choice((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff" * 4))
        return data[:header_len] + bytes(body[:len(parsed[1])])
    if roll < 0.7:
        return data[:header_len] + bytes(body[: rng.randrange(len(body) + 1)])
    return data[:header_len] + bytes(body) + rng.randbytes(rng.randint(1, 64))


ST_MUTATORS: tuple[tuple[str, Mutator, float], ...] = (
    # (name, mutator, weight)
    ("header", st_header_mutation, 5),
    ("metadata", st_metadata_mutation, 4),
    ("length", st_length_field, 1.5),
    ("header_text", st_header_text, 1.5),
    ("body", st_body, 2),
    ("bits", flip_bits, 1.5),
    ("bytes", set_bytes, 1),
    ("truncate", truncate, 1.5),
    ("delete", delete_range, 0.5),
    ("duplicate", duplicate_range, 0.5),
    ("insert", insert_random, 0.5),
    ("append", append_garbage, 0.5),
    ("random", random_bytes, 0.3),
)


def mutate(rng: random.Random, data: bytes,
           mutators: tuple[tuple[str, Mutator, float], ...]) -> tuple[bytes, str]:
    """Apply 1-3 mutators chosen by weight; returns (bytes, their names joined by '+')."""
    names, funcs, weights = zip(*mutators, strict=True)
    applied = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        i = rng.choices(range(len(funcs)), weights=weights)[0]
        try:
            data = funcs[i](rng, data)
            applied.append(names[i])
        except Exception:  # a format-aware mutator on input an earlier one broke: flip bits
            data = flip_bits(rng, data)
            applied.append("bits")
    return data, "+".join(applied)


def random_tensor_file(rng: random.Random) -> bytes:
    """A small valid safetensors file of random tensors (names, dtypes, shapes, metadata)."""
    import torch
    from safetensors.torch import save

    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    tensors = {}
    for i in range(rng.randint(0, 5)):
        shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        dtype = rng.choice((torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8,
                            torch.bool, torch.int8, torch.float64))
        values = torch.randn(shape, generator=generator) * 10
        name = rng.choice(("unet.", "text_encoder.", "lora_unet_", "model.diffusion_model.", ""))
        tensors[f"{name}w{i}"] = values.to(dtype)
    metadata = rng.choice((None, {"format": "pt"}, {"toile.family": '"toile"', "toile.rank": "4"}))
    return save(tensors, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# images


@cache
def _zero_rows(width: int, height: int, bytes_per_row: int) -> bytes:
    row = b"\0" + b"\0" * bytes_per_row
    return zlib.compress(row * height, 9)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """(type, payload) of each chunk of a PNG; None when the layout is broken."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        if len(payload) != length:
            return None
        chunks.append((kind, payload))
        pos += 12 + length
    return chunks


def png_join(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, payload in chunks:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        out.append(struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc))
    return b"".join(out)


def png_structure(rng: random.Random, data: bytes) -> bytes:
    """PNG-aware: huge or odd IHDR, thousands of chunks, split IDATs, zlib bombs in text and
    ICC chunks, APNG frame-control nonsense; CRCs are recomputed so the parser goes on."""
    chunks = png_chunks(data)
    if not chunks or chunks[0][0] != b"IHDR":
        return flip_bits(rng, data)
    width, height, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB",
                                                                       chunks[0][1][:13])
    choice = rng.randrange(10)
    if choice == 0:
        width, height = rng.choice(NASTY_INTS) % 2**32, rng.choice(NASTY_INTS) % 2**32
    elif choice == 1:
        depth, color = rng.choice((0, 1, 2, 3, 4, 8, 16, 32, 255)), rng.choice((0, 2, 3, 4, 6, 7))
        comp, filt, interlace = rng.choice((0, 0, 1)), rng.choice((0, 0, 5)), rng.choice((0, 1, 2))
    elif choice == 2:
        text = (b"tEXt", b"k\0" + b"v" * 10) if rng.random() < 0.5 else (b"zzZz", b"\0" * 4)
        chunks[1:1] = [text] * rng.choice((1000, 20_000))
    elif choice == 3:
        idat = b"".join(p for k, p in chunks if k == b"IDAT")
        rest = [c for c in chunks if c[0] != b"IDAT"]
        pieces = [(b"IDAT", idat[i:i + 1]) for i in range(len(idat))]
        return png_join([*rest[:-1], *pieces, rest[-1]])
    elif choice == 4:
        bomb = zlib.compress(b"\0" * rng.choice((2**20 + 1, 50 * 2**20)), 9)
        kind = rng.choice((b"zTXt", b"iCCP", b"iTXt"))
        payload = (b"toile\0\0" + bomb if kind != b"iTXt" else b"toile\0\x01\0\0\0" + bomb)
        chunks.insert(1, (kind, payload))
    elif choice == 5:
        # a real zero-filled image of a size near or over the limits: a decompression bomb
        side = rng.choice((4097, 8192, 8193, 30_000))
        width, height = side, side
        depth, color, interlace = 8, 0, 0
        rows = _zero_rows(side, min(side, 8192), side) if side <= 8192 else b"x\x9c\x03\0"
        chunks = [(b"IHDR", b""), (b"IDAT", rows), (b"IEND", b"")]
    elif choice == 6:
        num_frames = rng.choice((0, 1, 2**31 - 1, 2**32 - 1, 10**6))
        fctl = struct.pack(">IIIIIHHBB", 0, rng.choice(NASTY_INTS) % 2**32, height, 0, 0, 1, 0,
                           rng.randrange(4), rng.randrange(4))
        chunks[1:1] = [(b"acTL", struct.pack(">II", num_frames, 0)), (b"fcTL", fctl)]
    elif choice == 7:
        chunks.insert(1, (b"PLTE", rng.randbytes(rng.choice((0, 3, 5, 768, 771, 3000)))))
    elif choice == 8:
        chunks = [c for c in chunks if rng.random() < 0.7 or c[0] == b"IHDR"]
    else:
        chunks.insert(rng.randrange(1, len(chunks)), (b"tRNS", rng.randbytes(rng.randint(0, 600))))
    chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, comp, filt,
                                      interlace))
    return png_join(chunks)


def png_record(rng: random.Random, data: bytes) -> bytes:
    """Rewrite the ``toile`` (JSON record) or ``parameters`` text chunk that ``toile info`` and
    A1111's PNG Info read."""
    chunks = png_chunks(data)
    if not chunks:
        return flip_bits(rng, data)
    out = []
    target = rng.choice((b"toile", b"toile", b"parameters"))
    for kind, payload in chunks:
        key, _, value = payload.partition(b"\0")
        if kind == b"tEXt" and key == target:
            if target == b"toile":
                try:
                    record = json.loads(value.decode("latin-1"))
                except (ValueError, RecursionError):
                    record = {}
                roll = rng.random()
                if roll < 0.7:
                    text = dump_json(mutate_json_value(rng, record), rng)
                elif roll < 0.85:
                    text = rng.choice(("", "{", "[]", "5", "null", '"x"', "NaN", "{}",
                                       "[" * DEEP + "]" * DEEP, value.decode("latin-1")[:-1]))
                else:
                    text = dump_json(rng.choice(NASTY_JSON), rng)
                value = text.encode("latin-1", "replace")
            else:
                value = rng.choice((b"", b"\xff\xfe", rng.randbytes(100), value * 100))
            if rng.random() < 0.2:  # compressed, or international text
                out.append((b"zTXt", key + b"\0\0" + zlib.compress(value)))
                continue
            payload = key + b"\0" + value
        out.append((kind, payload))
    if rng.random() < 0.1:
        out.insert(1, (b"tEXt", b"toile\0" + b"{}"))  # a second record chunk
    return png_join(out)


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]] | None:
    """(marker, segment payload incl. length) up to SOS; the rest (scan data) as marker 0."""
    if not data.startswith(b"\xff\xd8"):
        return None
    segments, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        segments.append((marker, data[pos + 2:pos + 2 + length]))
        pos += 2 + length
        if marker == 0xDA:
            segments.append((0, data[pos:]))
            return segments
    return None


def jpeg_join(segments: list[tuple[int, bytes]]) -> bytes:
    out = [b"\xff\xd8"]
    for marker, payload in segments:
        out.append(payload if marker == 0 else bytes((0xFF, marker)) + payload)
    return b"".join(out)


def jpeg_structure(rng: random.Random, data: bytes) -> bytes:
    """JPEG-aware: frame sizes, component counts, tables, and many scans."""
    segments = jpeg_segments(data)
    if not segments:
        return flip_bits(rng, data)
    choice = rng.randrange(5)
    out = []
    for marker, payload in segments:
        if marker in (0xC0, 0xC1, 0xC2) and choice == 0:
            p = bytearray(payload)
            p[3:5] = struct.pack(">H", rng.choice((0, 1, 8192, 8193, 65535, 20000)))
            p[5:7] = struct.pack(">H", rng.choice((0, 1, 8192, 8193, 65535, 20000)))
            payload = bytes(p)
        elif marker in (0xC0, 0xC1, 0xC2) and choice == 1:
            p = bytearray(payload)
            p[7] = rng.choice((0, 2, 5, 255))  # number of components
            payload = bytes(p)
        elif marker in (0xC4, 0xDB) and choice == 2 and rng.random() < 0.5:
            p = bytearray(payload)
            for _ in range(rng.randint(1, 6)):
                p[rng.randrange(2, len(p))] = rng.randrange(256)
            payload = bytes(p)
        out.append((marker, payload))
    if choice == 3:
        # repeat the first scan (header + data): a progressive decoder rescans the whole image
        sos = next(i for i, (m, _) in enumerate(out) if m == 0xDA)
        scan = out[sos:sos + 2]
        tail = out[sos + 1][1]
        end = tail.rfind(b"\xff\xd9")
        body = tail[:end] if end >= 0 else tail
        count = rng.choice((2, 50, 99, 100, 101, 3000))
        repeated = [(0xDA, scan[0][1]), (0, body)] * count
        return jpeg_join([*out[:sos], *repeated]) + b"\xff\xd9"
    if choice == 4:
        out.insert(1, (0xE1, struct.pack(">H", 2 + 6 + 26) + b"Exif\0\0" + tiff_header(rng)))
    return jpeg_join(out)


def tiff_header(rng: random.Random) -> bytes:
    """A tiny little-endian TIFF header with one IFD of nasty entries (for EXIF)."""
    entries = [(0x0112, 3, 1, rng.choice((0, 1, 6, 9, 65535))),
               (0x8769, 4, 1, rng.choice((8, 0, 2**32 - 1)))]
    body = struct.pack("<2sHIH", b"II", 42, 8, len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack("<HHII", tag, kind, count, value)
    return body + struct.pack("<I", rng.choice((0, 8)))


def tiff_structure(rng: random.Random, data: bytes) -> bytes:
    """TIFF-aware: an IFD entry's type, count or value changed (sizes, strip offsets and
    counts, bits per sample, compression...), IFD loops, huge entry counts."""
    if data[:4] not in (b"II*\0", b"MM\0*") or len(data) < 8:
        return flip_bits(rng, data)
    endian = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    if ifd + 2 > len(data):
        return flip_bits(rng, data)
    (count,) = struct.unpack(endian + "H", data[ifd:ifd + 2])
    out = bytearray(data)
    roll = rng.random()
    if roll < 0.1:
        out[ifd:ifd + 2] = struct.pack(endian + "H", rng.choice((0, 1000, 65535)))
        return bytes(out)
    if roll < 0.2:
        next_at = ifd + 2 + 12 * count
        if next_at + 4 <= len(out):
            out[next_at:next_at + 4] = struct.pack(endian + "I", rng.choice((ifd, 4, 8, 2**32 - 1)))
        return bytes(out)
    for _ in range(rng.randint(1, 3)):
        if count == 0:
            break
        at = ifd + 2 + 12 * rng.randrange(count)
        if at + 12 > len(out):
            break
        part = rng.randrange(3)
        if part == 0:
            out[at + 2:at + 4] = struct.pack(endian + "H", rng.choice((0, 1, 2, 3, 4, 5, 7, 12, 13,
                                                                       16, 17, 255)))
        elif part == 1:
            out[at + 4:at + 8] = struct.pack(endian + "I",
                                             rng.choice((0, 1, 2, 255, 2**16, 2**31, 2**32 - 1)))
        else:
            out[at + 8:at + 12] = struct.pack(endian + "I", rng.choice(NASTY_INTS) % 2**32)
    return bytes(out)


def gif_structure(rng: random.Random, data: bytes) -> bytes:
    """GIF-aware: logical screen and frame sizes, colour table flags, many frames."""
    if not data.startswith((b"GIF87a", b"GIF89a")):
        return flip_bits(rng, data)
    out = bytearray(data)
    roll = rng.random()
    if roll < 0.4:
        out[6:10] = struct.pack("<HH", rng.choice((0, 1, 8193, 65535)),
                                rng.choice((0, 1, 8193, 65535)))
    elif roll < 0.6:
        out[10] = rng.randrange(256)  # global colour table flags and size
    elif roll < 0.8:
        at = data.find(b"\x2c")  # image descriptor
        if at > 0 and at + 9 < len(out):
            out[at + 1:at + 9] = struct.pack("<HHHH", *(rng.choice((0, 1, 65535, 8193))
                                                          for _ in range(4)))
    else:
        at = data.find(b"\x21\xf9")
        end = data.rfind(b"\x3b")
        if 0 < at < end:
            frame = data[at:end]
            return data[:at] + frame * rng.choice((2, 100, 3000)) + b"\x3b"
    return bytes(out)


def webp_structure(rng: random.Random, data: bytes) -> bytes:
    """WebP-aware: RIFF and chunk sizes, VP8X canvas size, ANIM/ANMF frames."""
    if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return flip_bits(rng, data)
    out = bytearray(data)
    roll = rng.random()
    if roll < 0.3:
        out[4:8] = struct.pack("<I", rng.choice((0, 4, len(data), 2**31, 2**32 - 1)))
    elif roll < 0.6 and len(out) >= 20:
        out[16:20] = struct.pack("<I", rng.choice((0, 1, 2**31, 2**32 - 1, len(data))))
    elif data[12:16] == b"VP8X" and len(out) >= 30:
        out[24:27] = rng.choice((0, 8191, 16383, 2**24 - 1)).to_bytes(3, "little")
        out[27:30] = rng.choice((0, 8191, 16383, 2**24 - 1)).to_bytes(3, "little")
    else:
        out = bytearray(flip_bits(rng, data))
    return bytes(out)


def structure(rng: random.Random, data: bytes) -> bytes:
    if data.startswith(b"\x89PNG"):
        return png_structure(rng, data)
    if data.startswith(b"\xff\xd8"):
        return jpeg_structure(rng, data)
    if data[:4] in (b"II*\0", b"MM\0*"):
        return tiff_structure(rng, data)
    if data.startswith(b"GIF"):
        return gif_structure(rng, data)
    if data[:4] == b"RIFF":
        return webp_structure(rng, data)
    return flip_bits(rng, data)


def splice(rng: random.Random, data: bytes) -> bytes:
    """One format's signature on another's body (a JPEG named .png, a PNG header on noise)."""
    magic = rng.choice((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\0",
                        b"RIFF\0\0\0\0WEBP", b"BM"))
    return magic + data[rng.randrange(min(len(data), 16) + 1):]


IMAGE_MUTATORS: tuple[tuple[str, Mutator, float], ...] = (
    ("structure", structure, 6),
    ("record", png_record, 2),
    ("bits", flip_bits, 3),
    ("bytes", set_bytes, 2),
    ("truncate", truncate, 3),
    ("delete", delete_range, 1),
    ("duplicate", duplicate_range, 1),
    ("insert", insert_random, 0.5),
    ("append", append_garbage, 0.5),
    ("splice", splice, 0.5),
    ("random", random_bytes, 0.2),
)


def image_seeds(record_json: str, parameters: str) -> list[tuple[str, bytes]]:
    """Small valid images in the formats users send: (name, bytes)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    rng = random.Random(0)
    rgb = Image.frombytes("RGB", (24, 16), rng.randbytes(24 * 16 * 3))
    rgba = Image.frombytes("RGBA", (16, 16), rng.randbytes(16 * 16 * 4))
    gray = rgb.convert("L")
    seeds: list[tuple[str, bytes]] = []

    def save(name: str, image: Image.Image, fmt: str, **options: Any) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        seeds.append((name, buffer.getvalue()))

    info = PngInfo()
    info.add_text("toile", record_json)
    info.add_text("parameters", parameters)
    save("png-record", rgb, "PNG", pnginfo=info)
    save("png-rgba", rgba, "PNG")
    save("png-palette", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG",
         transparency=0)
    save("png-gray", gray, "PNG")
    save("png-16bit", gray.convert("I").point(lambda v: v * 256).convert("I;16"), "PNG")
    save("png-1bit", gray.convert("1"), "PNG")
    save("apng", rgb, "PNG", save_all=True,
         append_images=[rgb.rotate(90), rgb.rotate(180)], duration=10)
    save("jpeg", rgb, "JPEG", quality=80)
    save("jpeg-progressive", rgb, "JPEG", progressive=True, quality=70)
    save("jpeg-gray", gray, "JPEG")
    save("jpeg-cmyk", rgb.convert("CMYK"), "JPEG")
    save("webp-lossy", rgb, "WEBP", quality=60)
    save("webp-lossless", rgba, "WEBP", lossless=True)
    save("webp-animated", rgb, "WEBP", save_all=True, append_images=[rgb.rotate(90)],
         duration=10)
    save("gif", rgb.convert("P"), "GIF")
    save("gif-animated", rgb.convert("P"), "GIF", save_all=True,
         append_images=[rgb.rotate(90).convert("P")], duration=10, transparency=0)
    save("tiff-raw", rgb, "TIFF")
    save("tiff-lzw", rgba, "TIFF", compression="tiff_lzw")
    save("tiff-deflate", gray, "TIFF", compression="tiff_adobe_deflate")
    save("tiff-packbits", rgb, "TIFF", compression="packbits")
    save("tiff-multipage", rgb, "TIFF", save_all=True, append_images=[rgb.rotate(90)])
    save("bmp", rgb, "BMP")
    return seeds
