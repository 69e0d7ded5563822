"""SecAgg+ as pure functions (Bonawitz et al. 2017; Bell et al. 2020): the server learns only
the sum of the surviving clients' vectors in ``Z_{2^m}``.

One round, four steps, each a message from every client still in:

0. ``advertise``: two public keys (one to encrypt shares, one to agree on masks) and a
   commitment ``sha256(b)`` to the client's self-mask seed ``b``.
1. ``share_keys``: Shamir shares (threshold ``t``) of ``b`` and of the mask private key, one
   pair per other client, each encrypted to that client; the server only forwards them. The
   clients that complete this step are ``U1``.
2. ``masked_input``: ``y_i = x_i + PRG(b_i) + sum_{j in U1, j > i} PRG(s_ij) - sum_{j < i}
   PRG(s_ij)`` mod ``2^m``, where ``s_ij`` comes from key agreement; pairwise masks cancel in the
   sum. The clients whose ``y`` arrives are ``U2``; the rest dropped out after the shares went.
3. ``unmask``: each survivor reveals, for every client of ``U1``, the share of ``b`` if that
   client is in ``U2`` and the share of its mask key if not; never both for one client.

The server then removes the self masks of ``U2`` and, from the reconstructed keys of the
dropped clients, the pairwise masks they left behind. With fewer than ``t`` answers to step 3
the sum cannot be recovered and :func:`unmask_sum` refuses with a :class:`SecAggError`.

Threat model: an honest-but-curious server and up to ``t - 1`` colluding clients learn nothing
about one client's vector beyond the sum. A client that lies about a share is detected: each
reconstructed secret is checked against what its owner committed to in step 0 (the hash of
``b``, the mask public key), the shares that do not fit are named, and the secret is recovered
from the others when at least ``t`` honest shares remain (otherwise the round fails).

Primitives are maintained ones, none written here: ECDH on P-384, HKDF, Fernet and ChaCha20
(``cryptography``) and Shamir sharing over GF(2^128) (``pycryptodome``), used the way Flower's
``flwr.common.secure_aggregation`` helpers use them (its internals are not imported: the
ClientApp stays outside the Flower boundary module). Flower's ``pseudo_rand_gen`` folds its
seed to 32 bits before seeding numpy, which would leave a mask guessable in 2^32 tries;
ChaCha20 keyed by the full 256-bit seed does not.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Util.Padding import pad, unpad
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from feddistill.secagg.quantize import Group, SecAggError, add, subtract

CURVE = ec.SECP384R1()
_KEY_BYTES = 48  # a P-384 private value
SEED_BYTES = 32
MAX_RECOVERY_TRIES = 10_000  # subsets of shares tried to get around lying clients

SELF_MASK = "b"  # share kinds
MASK_KEY = "s"


def _public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )


def _public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, data)
    except ValueError as err:
        raise SecAggError(f"not a P-384 public key ({len(data)} bytes): {err}") from None


def _private_key(value: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(value, "big"), CURVE)


# The order of the P-384 group (FIPS 186-4, D.1.2.4): private values live in [1, order - 1].
_ORDER = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)


def _new_key(random_bytes: Callable[[int], bytes]) -> ec.EllipticCurvePrivateKey:
    value = int.from_bytes(random_bytes(_KEY_BYTES + 16), "big") % (_ORDER - 1) + 1
    return _private_key(value.to_bytes(_KEY_BYTES, "big"))


def _agreed_key(own: ec.EllipticCurvePrivateKey, other_public: bytes) -> bytes:
    """32 bytes both ends derive: ECDH, then HKDF-SHA256 (as Flower's ``generate_shared_key``)."""
    secret = own.exchange(ec.ECDH(), _public_key(other_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=None).derive(secret)


def _fernet(own: ec.EllipticCurvePrivateKey, other_public: bytes) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(_agreed_key(own, other_public)))


def create_shares(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it: the secret
    padded to 16-byte chunks, each chunk shared by pycryptodome; a share is its 4-byte index
    then its share of every chunk (Flower's layout)."""
    padded = pad(secret, 16)
    shares = [bytearray(i.to_bytes(4, "little")) for i in range(1, count + 1)]
    for start in range(0, len(padded), 16):
        for index, part in Shamir.split(threshold, count, padded[start : start + 16], ssss=False):
            shares[index - 1] += part
    return [bytes(s) for s in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret from ``threshold`` shares of :func:`create_shares`; ValueError if they do not
    make one (wrong shares usually break the padding)."""
    chunks = (len(shares[0]) - 4) // 16
    if chunks < 1 or any(len(s) != 4 + 16 * chunks for s in shares):
        raise ValueError("shares of different lengths")
    padded = b"".join(
        Shamir.combine(
            [(int.from_bytes(s[:4], "little"), s[4 + 16 * c : 20 + 16 * c]) for s in shares],
            ssss=False,
        )
        for c in range(chunks)
    )
    return unpad(padded, 16)


def prg(seed: bytes, length: int, spec: Group) -> np.ndarray:
    """``length`` uniform elements of ``Z_{2^m}`` from ``seed`` (ChaCha20 keystream)."""
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    raw = stream.update(bytes(8 * length))
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64) & spec.mask


@dataclass(frozen=True)
class Advertised:
    """Step 0 of one client: public keys and the commitment to its self-mask seed."""

    encryption_key: bytes
    mask_key: bytes
    self_mask_commitment: bytes


@dataclass(frozen=True)
class Share:
    kind: str  # SELF_MASK or MASK_KEY
    data: bytes


class Client:
    """One client's side of one round; a new object (new keys, new seed) every round.

    ``random_bytes`` draws the secrets (``secrets.token_bytes``; tests pass a seeded source).
    """

    def __init__(self, cid: int, random_bytes: Callable[[int], bytes] = secrets.token_bytes):
        self.cid = cid
        self._enc = _new_key(random_bytes)
        self._mask = _new_key(random_bytes)
        self._self_seed = random_bytes(SEED_BYTES)
        self._roster: dict[int, Advertised] = {}
        self._peers: dict[int, bytes] = {}  # U1 minus this client: the ciphertexts it got
        self._threshold = 0
        self._own = b""  # this client's own pair of shares (share_keys)

    def dump(self) -> bytes:
        """This client's round state, to keep on the node between the protocol's messages
        (a ClientApp keeps nothing in memory between messages)."""

        def key(k: ec.EllipticCurvePrivateKey) -> str:
            return k.private_numbers().private_value.to_bytes(_KEY_BYTES, "big").hex()

        state = {
            "cid": self.cid,
            "enc": key(self._enc),
            "mask": key(self._mask),
            "seed": self._self_seed.hex(),
            "threshold": self._threshold,
            "roster": {str(j): [a.encryption_key.hex(), a.mask_key.hex(),
                                a.self_mask_commitment.hex()]
                       for j, a in self._roster.items()},
            "peers": {str(j): c.decode() for j, c in self._peers.items()},
            "own": self._own.hex(),
        }  # fmt: skip
        return json.dumps(state).encode()

    @classmethod
    def load(cls, data: bytes) -> Client:
        state = json.loads(data)
        self = cls.__new__(cls)
        self.cid = int(state["cid"])
        self._enc = _private_key(bytes.fromhex(state["enc"]))
        self._mask = _private_key(bytes.fromhex(state["mask"]))
        self._self_seed = bytes.fromhex(state["seed"])
        self._threshold = int(state["threshold"])
        self._roster = {
            int(j): Advertised(*(bytes.fromhex(v) for v in values))
            for j, values in state["roster"].items()
        }
        self._peers = {int(j): c.encode() for j, c in state["peers"].items()}
        self._own = bytes.fromhex(state["own"])
        return self

    def advertise(self) -> Advertised:
        return Advertised(
            _public_bytes(self._enc),
            _public_bytes(self._mask),
            hashlib.sha256(self._self_seed).digest(),
        )

    def share_keys(self, roster: Mapping[int, Advertised], threshold: int) -> dict[int, bytes]:
        """Encrypted shares for every other client of ``roster`` (which must include this one)."""
        if self.cid not in roster:
            raise SecAggError(f"client {self.cid} is not in the round's roster")
        ids = sorted(roster)
        if not 2 <= threshold <= len(ids):
            raise SecAggError(f"threshold {threshold} with {len(ids)} clients: expected 2..n")
        self._roster, self._threshold = dict(roster), threshold
        mask_value = self._mask.private_numbers().private_value.to_bytes(_KEY_BYTES, "big")
        b_shares = create_shares(self._self_seed, threshold, len(ids))
        s_shares = create_shares(mask_value, threshold, len(ids))
        out = {}
        for j, b_share, s_share in zip(ids, b_shares, s_shares, strict=True):
            plain = _pack_shares(self.cid, j, b_share, s_share)
            if j == self.cid:
                self._own = plain
                continue
            out[j] = _fernet(self._enc, roster[j].encryption_key).encrypt(plain)
        return out

    def masked_input(
        self, values: np.ndarray, received: Mapping[int, bytes], spec: Group
    ) -> np.ndarray:
        """``values`` (group elements) masked; ``received``: the ciphertexts addressed to this
        client by the other clients of ``U1``, as the server forwarded them."""
        unknown = sorted(set(received) - set(self._roster))
        if unknown or self.cid in received:
            raise SecAggError(f"shares from clients outside the roster: {unknown or [self.cid]}")
        self._peers = dict(received)
        x = np.asarray(values, dtype=np.uint64)
        if np.any(x > spec.mask):
            raise SecAggError("a value is outside Z_2^m: quantize first")
        y = add(x, prg(self._self_seed, len(x), spec), spec)
        for j in sorted(received):
            p = prg(_agreed_key(self._mask, self._roster[j].mask_key), len(x), spec)
            y = add(y, p, spec) if self.cid < j else subtract(y, p, spec)
        return y

    def unmask(self, survivors: Collection[int]) -> dict[int, Share]:
        """For each client of ``U1``: the share of its self-mask seed if it survived, of its mask
        key if not. Refuses a survivor list below the threshold (the server would then be asking
        for masks of clients whose inputs it holds)."""
        u1 = {*self._peers, self.cid}
        alive = set(survivors) & u1
        if self.cid not in alive or len(alive) < self._threshold:
            raise SecAggError(
                f"{len(alive)} survivors named; the threshold is {self._threshold}: not unmasking"
            )
        out = {}
        for j in sorted(u1):
            if j == self.cid:
                plain = self._own
            else:
                fernet = _fernet(self._enc, self._roster[j].encryption_key)
                try:
                    plain = fernet.decrypt(self._peers[j])
                except InvalidToken:  # tampered with, or not encrypted to this client
                    raise SecAggError(f"the shares from client {j} do not decrypt") from None
            sender, receiver, b_share, s_share = _unpack_shares(plain)
            if (sender, receiver) != (j, self.cid):
                raise SecAggError(f"shares labelled {sender}->{receiver}, expected {j}->{self.cid}")
            out[j] = Share(SELF_MASK, b_share) if j in alive else Share(MASK_KEY, s_share)
        return out


def _pack_shares(sender: int, receiver: int, b_share: bytes, s_share: bytes) -> bytes:
    return struct.pack("<QQI", sender, receiver, len(b_share)) + b_share + s_share


def _unpack_shares(plain: bytes) -> tuple[int, int, bytes, bytes]:
    sender, receiver, n = struct.unpack_from("<QQI", plain)
    rest = plain[struct.calcsize("<QQI") :]
    return sender, receiver, rest[:n], rest[n:]


@dataclass
class Unmasked:
    """The group sum of ``survivors``' vectors and what it took."""

    total: np.ndarray
    survivors: list[int]
    dropped: list[int]  # in U1, no masked vector: their pairwise masks were removed
    liars: dict[int, list[int]]  # owner of a secret -> responders whose shares did not fit


def unmask_sum(
    roster: Mapping[int, Advertised],
    u1: Collection[int],
    masked: Mapping[int, np.ndarray],
    responses: Mapping[int, Mapping[int, Share]],
    spec: Group,
    threshold: int,
) -> Unmasked:
    """The server's last step: the sum of ``masked`` (the vectors of ``U2``) without masks."""
    survivors = sorted(masked)
    dropped = sorted(set(u1) - set(survivors))
    if len(survivors) < threshold or len(responses) < threshold:
        raise SecAggError(
            f"{len(survivors)} masked vectors and {len(responses)} unmasking answers; the "
            f"threshold is {threshold}: the sum cannot be recovered (round failed)"
        )
    lengths = {len(v) for v in masked.values()}
    if len(lengths) != 1:
        raise SecAggError(f"masked vectors of different lengths {sorted(lengths)}")
    (length,) = lengths
    total = np.zeros(length, dtype=np.uint64)
    for i in survivors:
        total = add(total, np.asarray(masked[i], dtype=np.uint64) & spec.mask, spec)
    liars: dict[int, list[int]] = {}
    for i in survivors:
        commitment = roster[i].self_mask_commitment
        seed, bad = _recover(i, SELF_MASK, responses, threshold,
                             lambda s, c=commitment: hashlib.sha256(s).digest() == c)  # fmt: skip
        liars.update({i: bad} if bad else {})
        total = subtract(total, prg(seed, length, spec), spec)
    for j in dropped:
        public = roster[j].mask_key
        value, bad = _recover(j, MASK_KEY, responses, threshold,
                              lambda s, p=public: _public_bytes(_private_key(s)) == p)  # fmt: skip
        liars.update({j: bad} if bad else {})
        key = _private_key(value)
        for i in survivors:  # y_i holds +PRG(s_ij) if i < j, else -PRG(s_ij)
            p = prg(_agreed_key(key, roster[i].mask_key), length, spec)
            total = subtract(total, p, spec) if i < j else add(total, p, spec)
    return Unmasked(total, survivors, dropped, liars)


def _recover(
    owner: int,
    kind: str,
    responses: Mapping[int, Mapping[int, Share]],
    threshold: int,
    valid: Callable[[bytes], bool],
) -> tuple[bytes, list[int]]:
    """``owner``'s secret from ``threshold`` shares that reconstruct what it committed to, and
    the responders whose shares do not fit that secret."""
    shares = {
        r: resp[owner].data
        for r, resp in sorted(responses.items())
        if owner in resp and resp[owner].kind == kind
    }
    if len(shares) < threshold:
        raise SecAggError(
            f"{len(shares)} shares of client {owner}'s {kind!r} secret; {threshold} needed"
        )
    ids = sorted(shares)
    # The usual case, no liar: the first t shares give the committed secret, and each other
    # share gives it again with t - 1 of them.
    first = ids[:threshold]
    secret = _combine([shares[r] for r in first])
    if secret is not None and valid(secret):
        base = [shares[r] for r in first[:-1]]
        if all(_combine([*base, shares[r]]) == secret for r in ids[threshold:]):
            return secret, []
    # Otherwise every t-subset (bounded): the secret is what any subset that reconstructs the
    # commitment gives (binding: no wrong secret passes), and a responder whose share is in no
    # such subset is named. With at least t honest shares that names exactly the lone liars.
    found: bytes | None = None
    good: set[int] = set()
    for subset in itertools.islice(itertools.combinations(ids, threshold), MAX_RECOVERY_TRIES):
        candidate = _combine([shares[r] for r in subset])
        if candidate is not None and valid(candidate):
            found = candidate
            good.update(subset)
    if found is None:
        raise SecAggError(
            f"no {threshold} of the {len(shares)} shares of client {owner}'s {kind!r} secret "
            "reconstruct what it committed to: too many wrong shares (round failed)"
        )
    return found, [r for r in ids if r not in good]


def _combine(shares: list[bytes]) -> bytes | None:
    try:
        return combine_shares(shares)
    except (ValueError, IndexError, struct.error):  # a wrong share among them
        return None


def pack(values: np.ndarray, spec: Group) -> bytes:
    """Group elements on the wire: ``ceil(m / 8)`` little-endian bytes each."""
    width = (spec.modulus_bits + 7) // 8
    raw = np.asarray(values, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return raw[:, :width].tobytes()


def unpack(data: bytes, length: int, spec: Group) -> np.ndarray:
    width = (spec.modulus_bits + 7) // 8
    if len(data) != width * length:
        raise SecAggError(f"masked vector of {len(data)} bytes; expected {width * length}")
    raw = np.zeros((length, 8), dtype=np.uint8)
    raw[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(length, width)
    return raw.view("<u8").reshape(length).astype(np.uint64) & spec.mask
