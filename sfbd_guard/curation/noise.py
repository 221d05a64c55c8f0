"""The fixed Gaussian noise of protected records: y = x/127.5 - 1 + sigma * eps, not clipped.

eps is drawn from a generator keyed by the data owner's secret (see `keys.py`), never from a public
value: whoever could regenerate eps could subtract it and rebuild the original byte for byte.

Per record, the generator is ChaCha20 (RFC 8439, OpenSSL through the `cryptography` package) keyed with
HMAC-SHA256(noise subkey, context ‖ pixel sha256 ‖ record_id), where the noise subkey is derived from the
owner's secret by HKDF (keys.py) and the context binds the noise to sigma and the image shape.
Its keystream gives 53-bit uniforms, turned into standard normals by the Box–Muller transform in float64.
ChaCha20 is a stream cipher: its output cannot be predicted, nor its key recovered, from any amount of
other output, so knowing some pixels of an image (a black background, say) reveals nothing about the
noise on the others. Non-cryptographic generators (PCG64, Philox) make no such promise.

A record's noise depends only on (noise subkey, sigma, shape, pixels, record_id), never on its position,
the split, the file order or the number of workers, so with the same key the same policy and data give
byte-identical rows. Binding the pixels means a different image under the same id never shares noise (the
difference of two such copies would otherwise be the difference of the originals: the cancellation attack,
tests/security/test_noise_keys.py); binding the id as well means an attacker who gets an image of their
choice prepared cannot use the owner to test whether a victim's record holds that image (their submission
never carries the victim's id). What remains: one record with the same pixels released twice under one key
carries the same noise, so the two copies are linkable (and identical: averaging them gives nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np

GENERATOR = "chacha20-boxmuller-v2"  # in the card; changes whenever the bytes of eps would (v2: subkey, pixels)
_NONCE = bytes(16)  # ChaCha20's 32-bit block counter and 96-bit nonce: zero, each record has its own key
_TWO_PI = 2.0 * np.pi
_SCALE = 2.0 ** -53


def record_key(noise_subkey: bytes, record_id: str, *, sigma: float, shape: tuple[int, ...], pixel_sha256: str) -> bytes:
    """The 256-bit ChaCha20 key of one record's noise: HMAC-SHA256 of the context, the pixels' sha256 and the id.

    Binding sigma and the shape makes two directories prepared with one key at different settings draw
    independent noise: with the same eps, (y1 - y2) / (sigma1 - sigma2) would give eps away. Binding the
    pixel sha256 (32 bytes, fixed length, before the id) makes another image under the same id draw other noise.
    """
    context = b"sfbd_guard/noise/v2\x00" + struct.pack("<d", sigma) + struct.pack(f"<{len(shape)}I", *shape)
    message = context + b"\x00" + bytes.fromhex(pixel_sha256) + record_id.encode("utf-8")
    return hmac.new(noise_subkey, message, hashlib.sha256).digest()


def keyed_normals(key: bytes, count: int) -> np.ndarray:
    """`count` standard normals (float64) from ChaCha20(key): Box–Muller on pairs of 53-bit uniforms."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    pairs = (count + 1) // 2
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(16 * pairs)), dtype="<u8").reshape(pairs, 2)
    u1 = ((words[:, 0] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * _SCALE  # (0, 1]: log is finite
    u2 = (words[:, 1] >> np.uint64(11)).astype(np.float64) * _SCALE  # [0, 1)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = _TWO_PI * u2
    normals = np.empty((pairs, 2), dtype=np.float64)
    np.multiply(radius, np.cos(angle), out=normals[:, 0])
    np.multiply(radius, np.sin(angle), out=normals[:, 1])
    return normals.reshape(-1)[:count]


def noised_copies(pixels: np.ndarray, *, sigma: float, keys: list[bytes]) -> np.ndarray:
    """uint8 (N, C, H, W) pixels → float16 x/127.5 - 1 + sigma * eps; row i's eps from ChaCha20(keys[i]).

    eps is rounded to float32 and the sum computed in float32, then rounded once to float16.
    """
    noisy = np.empty(pixels.shape, dtype=np.float16)
    row = np.empty(pixels.shape[1:], dtype=np.float32)
    size = int(np.prod(pixels.shape[1:]))
    for out, x, key in zip(noisy, pixels, keys, strict=True):
        row[...] = keyed_normals(key, size).reshape(row.shape)
        row *= np.float32(sigma)
        row += x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        out[...] = row  # rounded to float16
    return noisy
