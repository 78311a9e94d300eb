"""C2PA content credentials and the IPTC digital source type, for the PNGs toile writes.

Two marks of provenance, both in the file's metadata (the invisible watermark is the one in the
pixels, :mod:`toile.safety.watermark`):

- **IPTC digital source type in XMP** (:func:`with_iptc_xmp`): an XMP packet in an ``iTXt``
  chunk keyed ``XML:com.adobe.xmp`` whose ``Iptc4xmpExt:DigitalSourceType`` is IPTC's
  ``trainedAlgorithmicMedia``, the IPTC Photo Metadata Standard's mark of an image made by
  generative AI. Unsigned: anyone can strip or forge it.
- **C2PA manifest** (:func:`sign_png`, :func:`verify`): a signed claim embedded in the PNG (a
  ``caBX`` chunk) by the ``c2pa-python`` bindings of the Content Authenticity Initiative's
  c2pa-rs, holding the actions (``c2pa.created``, or ``c2pa.opened`` + ``c2pa.edited`` with the
  input image as the parent ingredient), the digital source type, toile as claim generator, and
  the generation record as the assertion ``org.toile.generation``. The manifest's hash covers the
  whole file except itself, so the XMP goes in first and nothing may change the file after
  signing: :func:`sign_png` adds the XMP itself, before signing.

Signing needs an X.509 certificate chain (PEM: the signing certificate first, then any
intermediates, without the root) and its private key (PEM, PKCS#8 or traditional, unencrypted).
c2pa-rs checks the C2PA certificate profile when it signs and validates: the signing certificate
must not be self-signed, must be within its validity period, carry an authority key identifier,
a key usage with ``digitalSignature``, and an extended key usage C2PA accepts
(:data:`ALLOWED_EKUS`), not ``anyExtendedKeyUsage``; :func:`load_c2pa_config` checks the same,
with messages that say which. ``emailProtection`` is the safest choice: c2pa-rs's default
settings (and so other tools built on it) reject ``documentSigning`` and C2PA's own
``claimSigning`` unless told otherwise, which toile does. A timestamp authority URL (RFC 3161) is
optional; with one, signing asks that server for a timestamp (the one network call here, made
only when a deployment configures it).

Validity and trust are two questions, and :class:`C2paReport` keeps them apart:

- ``valid``: the signature verifies, the hashes match the file, the certificate profile and its
  validity period are right, the manifest is well formed (c2pa-rs's validation state ``Valid`` or
  ``Trusted``);
- ``trusted``: in addition the signing certificate chains to a trust anchor (``Trusted``).
  Without ``trust_anchors`` a signer from a deployment's own CA is "untrusted" (the failure
  code ``signingCredential.untrusted``, which alone does not make a manifest invalid); pass the
  deployment's root(s), or the C2PA trust list's anchors, as PEM. Reading fetches nothing (no
  remote manifests, no OCSP).

c2pa is imported on first use (it loads a 23 MB native library), never at import.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

from toile.errors import ToileError, one_line

if TYPE_CHECKING:
    from types import ModuleType

TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
)
RECORD_LABEL = "org.toile.generation"
XMP_KEY = "XML:com.adobe.xmp"
IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
UNTRUSTED = "signingCredential.untrusted"
# Extended key usages a signing certificate may carry: those c2pa-rs accepts by default
# (emailProtection, timeStamping, OCSPSigning), documentSigning and C2PA's own claimSigning
# (C2PA 2.x's certificate profile), and Microsoft's, which c2pa-python's settings guide names.
# c2pa-rs 0.91's default list lacks the last three and calls such a certificate
# "signingCredential.invalid: certificate missing required EKU" (measured), so toile passes
# this list (settings ``trust.trust_config``) whenever it signs or reads.
ALLOWED_EKUS = {
    "1.3.6.1.5.5.7.3.4": "emailProtection",
    "1.3.6.1.5.5.7.3.8": "timeStamping",
    "1.3.6.1.5.5.7.3.9": "OCSPSigning",
    "1.3.6.1.5.5.7.3.36": "documentSigning",
    "1.3.6.1.4.1.62558.2.1": "c2pa-kp-claimSigning",
    "1.3.6.1.4.1.311.76.59.1.9": "Microsoft C2PA signing",
}
_TRUST_CONFIG = "".join(f"{oid}\n" for oid in ALLOWED_EKUS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_XMP_BYTES = 1 << 20  # an XMP packet larger than this is not read
MANIFEST_CHUNK = b"caBX"  # where c2pa-rs embeds the manifest store in a PNG
_FORMATS = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}


class CredentialsError(ToileError):
    """Content credentials could not be made or read (bad key or certificate, corrupt file)."""


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class C2paConfig:
    """What signing needs; build it with :func:`load_c2pa_config`, which checks the files.

    ``cert_chain``: PEM certificates, the signing certificate first, then its intermediates;
    ``private_key``: the signing certificate's key, PEM, unencrypted; ``algorithm``: one of
    :data:`ALGORITHMS`, matching the key (``es256`` for EC P-256, ``es384`` P-384, ``es512``
    P-521, ``ps256``/``ps384``/``ps512`` RSA-PSS, ``ed25519``); ``tsa_url``: an RFC 3161
    timestamp authority, or None for none.
    """

    cert_chain: Path
    private_key: Path
    algorithm: str = "es256"
    tsa_url: str | None = None


def load_c2pa_config(
    cert_chain: str | Path,
    private_key: str | Path,
    algorithm: str | None = None,
    tsa_url: str | None = None,
) -> C2paConfig:
    """Check the certificate chain and key and return the config; ``algorithm`` None = the one
    the key implies. Anything wrong is a one-line :class:`CredentialsError` naming the file."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    cert_path, key_path = Path(cert_chain).expanduser(), Path(private_key).expanduser()
    cert_pem = _read(cert_path, "c2pa certificate chain")
    key_pem = _read(key_path, "c2pa private key")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CredentialsError(
            f"c2pa certificate chain {cert_path}: not PEM certificates ({one_line(exc)})"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CredentialsError(
            f"c2pa private key {key_path} is encrypted; give an unencrypted PEM key "
            "(`openssl pkey -in KEY -out PLAIN`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CredentialsError(
            f"c2pa private key {key_path}: not a PEM private key ({one_line(exc)})"
        ) from None

    if isinstance(key, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        implied = curves.get(key.curve.name)
        allowed = {implied} if implied else set()
        if implied is None:
            raise CredentialsError(
                f"c2pa private key {key_path}: EC curve {key.curve.name} is not one C2PA "
                "signs with (P-256, P-384, P-521)"
            )
    elif isinstance(key, rsa.RSAPrivateKey):
        implied, allowed = "ps256", {"ps256", "ps384", "ps512"}
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        implied, allowed = "ed25519", {"ed25519"}
    else:
        raise CredentialsError(
            f"c2pa private key {key_path}: a {type(key).__name__.removeprefix('_')} key; C2PA "
            "signs with EC (P-256/384/521), RSA (PSS) or Ed25519 keys"
        )
    alg = (algorithm or implied).lower()
    if alg not in ALGORITHMS:
        raise CredentialsError(
            f"c2pa algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}"
        )
    if alg not in allowed:
        raise CredentialsError(
            f"c2pa algorithm {alg} does not match the private key {key_path} "
            f"(it takes {', '.join(sorted(allowed))})"
        )

    leaf = certs[0]
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CredentialsError(
            f"c2pa private key {key_path} is not the key of the first certificate in "
            f"{cert_path} ({_cn(leaf.subject) or leaf.subject.rfc4514_string()}); the signing "
            "certificate must come first"
        )
    if leaf.subject == leaf.issuer:
        raise CredentialsError(
            f"c2pa certificate chain {cert_path}: the signing certificate is self-signed, which "
            "C2PA refuses; sign it with a CA and list the CA's intermediates after it"
        )
    _check_profile(leaf, cert_path)
    if tsa_url is not None and not tsa_url.startswith(("http://", "https://")):
        raise CredentialsError(
            f"c2pa timestamp authority URL {tsa_url!r}: must be http:// or https://"
        )
    return C2paConfig(cert_path, key_path, alg, tsa_url)


def _check_profile(leaf: Any, cert_path: Path) -> None:
    """The parts of C2PA's certificate profile that c2pa-rs refuses to sign with, checked here
    because its own message for all of them is "Signature: the certificate is invalid"."""
    import datetime as dt

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    where = f"c2pa certificate chain {cert_path}: the signing certificate"
    now = dt.datetime.now(dt.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise CredentialsError(
            f"{where} is valid from {leaf.not_valid_before_utc:%Y-%m-%d} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d}, not now"
        )

    def extension(kind: type) -> Any:
        try:
            return leaf.extensions.get_extension_for_class(kind).value
        except x509.ExtensionNotFound:
            return None

    usage = extension(x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise CredentialsError(f"{where} needs a key usage extension with digitalSignature")
    ekus = extension(x509.ExtendedKeyUsage)
    names = ", ".join(ALLOWED_EKUS.values())
    if ekus is None:
        raise CredentialsError(f"{where} has no extended key usage; C2PA needs one of {names}")
    oids = {oid.dotted_string for oid in ekus}
    if ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE.dotted_string in oids or not (
        oids & set(ALLOWED_EKUS)
    ):
        raise CredentialsError(
            f"{where}'s extended key usages ({', '.join(sorted(oids))}) include none C2PA "
            f"accepts ({names}), or anyExtendedKeyUsage, which C2PA refuses"
        )
    if extension(x509.AuthorityKeyIdentifier) is None:
        raise CredentialsError(f"{where} has no authority key identifier, which C2PA requires")


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CredentialsError(f"{what}: no such file: {path}") from None
    except IsADirectoryError:
        raise CredentialsError(f"{what}: {path} is a folder, not a PEM file") from None
    except OSError as exc:
        reason = one_line(exc.strerror or exc)
        raise CredentialsError(f"{what}: cannot read {path} ({reason})") from None
    if not data.strip():
        raise CredentialsError(f"{what}: {path} is empty")
    return data


def _cn(name: Any) -> str | None:
    from cryptography.x509.oid import NameOID

    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


# -- IPTC digital source type in XMP ---------------------------------------------------------


def iptc_xmp_packet(digital_source_type: str = TRAINED_ALGORITHMIC_MEDIA) -> str:
    """The XMP packet :func:`with_iptc_xmp` writes: IPTC's digital source type and toile as the
    creator tool. ``save_png`` may put it in directly (``PngInfo.add_itxt(XMP_KEY, packet)``)."""
    from xml.sax.saxutils import escape

    from toile import __version__

    source = escape(digital_source_type)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        f'    xmlns:Iptc4xmpExt="{IPTC_EXT_NS}"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/">\n'
        f"   <Iptc4xmpExt:DigitalSourceType>{source}</Iptc4xmpExt:DigitalSourceType>\n"
        f"   <xmp:CreatorTool>toile {__version__}</xmp:CreatorTool>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )


def with_iptc_xmp(png_bytes: bytes, digital_source_type: str = TRAINED_ALGORITHMIC_MEDIA) -> bytes:
    """``png_bytes`` with an XMP ``iTXt`` chunk right after ``IHDR`` holding IPTC's digital
    source type; an XMP chunk already there is replaced. Every other byte stays as it was.

    Refused (:class:`CredentialsError`) on a PNG that already has a C2PA manifest: a new chunk would
    break the manifest's hash, so add the XMP first and sign after (:func:`sign_png` does).

    Written on the chunks rather than through Pillow, whose ``save`` re-encodes the pixels and
    drops the chunks it does not know; a PNG chunk is length, type, data and a CRC-32.
    """
    chunks = _png_chunks(png_bytes)
    if any(kind == MANIFEST_CHUNK for kind, _, _ in chunks):
        raise CredentialsError(
            "the PNG already carries a C2PA manifest; adding XMP now would invalidate it "
            "(add the XMP before signing)"
        )
    packet = iptc_xmp_packet(digital_source_type).encode("utf-8")
    # iTXt: keyword, NUL, compression flag 0, method 0, language tag "", NUL, translated "", NUL
    itxt = XMP_KEY.encode("latin-1") + b"\x00\x00\x00" + b"\x00" + b"\x00" + packet
    out = [PNG_SIGNATURE]
    for kind, start, end in chunks:
        if kind == b"iTXt" and _itxt_keyword(png_bytes[start + 8 : end - 4]) == XMP_KEY:
            continue
        out.append(png_bytes[start:end])
        if kind == b"IHDR":
            out.append(_chunk(b"iTXt", itxt))
    return b"".join(out)


def read_iptc_digital_source_type(png_bytes: bytes) -> str | None:
    """The ``Iptc4xmpExt:DigitalSourceType`` in the PNG's XMP, or None if there is none."""
    for kind, start, end in _png_chunks(png_bytes):
        if kind != b"iTXt":
            continue
        data = png_bytes[start + 8 : end - 4]
        if _itxt_keyword(data) != XMP_KEY:
            continue
        text = _itxt_text(data)
        if text is None:
            return None
        try:
            root = ElementTree.fromstring(_strip_xpacket(text))
        except ElementTree.ParseError:
            return None
        node = root.find(f".//{{{IPTC_EXT_NS}}}DigitalSourceType")
        if node is not None and node.text:
            return node.text.strip()
        for desc in root.iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description"):
            value = desc.get(f"{{{IPTC_EXT_NS}}}DigitalSourceType")  # the attribute form
            if value:
                return value.strip()
        return None
    return None


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk, ``end`` past its CRC; a one-line error if ``data`` is
    not a whole PNG."""
    if not data.startswith(PNG_SIGNATURE):
        raise CredentialsError("not a PNG file (its first 8 bytes are not the PNG signature)")
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise CredentialsError(f"truncated PNG: a chunk header is cut off at byte {pos}")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise CredentialsError(f"truncated PNG: chunk {kind!r} at byte {pos} runs past the end")
        chunks.append((kind, pos, end))
        pos = end
        if kind == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR":
        raise CredentialsError("not a valid PNG file (it does not start with an IHDR chunk)")
    if chunks[-1][0] != b"IEND":
        raise CredentialsError("truncated PNG: no IEND chunk")
    return chunks


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _itxt_keyword(data: bytes) -> str:
    return data.split(b"\x00", 1)[0].decode("latin-1")


def _itxt_text(data: bytes) -> str | None:
    try:
        _keyword, rest = data.split(b"\x00", 1)
        compressed, _method = rest[0], rest[1]
        _lang, _translated, text = rest[2:].split(b"\x00", 2)
        if compressed:  # bounded: a few kB of zlib can claim gigabytes
            inflater = zlib.decompressobj()
            text = inflater.decompress(text, MAX_XMP_BYTES + 1)
            if len(text) > MAX_XMP_BYTES:
                return None
        return text.decode("utf-8") if len(text) <= MAX_XMP_BYTES else None
    except (ValueError, IndexError, zlib.error, UnicodeDecodeError):
        return None


def _strip_xpacket(text: str) -> str:
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    if start >= 0 and end > start:
        return text[start : end + len("</x:xmpmeta>")]
    start = text.find("<rdf:RDF")
    return text[start:] if start >= 0 else text


# -- signing ---------------------------------------------------------------------------------


def sign_png(
    png_bytes: bytes,
    record: dict[str, Any],
    config: C2paConfig,
    ingredient: bytes | None = None,
    ingredient_format: str = "image/png",
    *,
    add_xmp: bool = True,
) -> bytes:
    """``png_bytes`` with IPTC's XMP (unless ``add_xmp`` is False) and a signed C2PA manifest.

    The manifest: claim generator ``toile <version>``; actions ``c2pa.created`` with the digital
    source type ``trainedAlgorithmicMedia`` or, with an ``ingredient`` (the input image of an
    img2img, inpaint, outpaint or edit request, as the bytes that came in), ``c2pa.opened`` of
    that image as the parent ingredient (C2PA requires an edit's first action to open its
    parent) followed by ``c2pa.edited`` with that source type; and ``record`` (a JSON object:
    the image's generation record) as the assertion :data:`RECORD_LABEL`. If the input image
    carries content credentials of its own, they are kept inside the ingredient.
    """
    c2pa = _c2pa()
    from toile import __version__

    try:
        record_json = json.loads(json.dumps(record, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CredentialsError(f"c2pa: the record is not plain JSON ({one_line(exc)})") from None
    if not isinstance(record_json, dict):
        raise CredentialsError(
            f"c2pa: the record must be a JSON object, not {type(record).__name__}"
        )
    if add_xmp:
        png_bytes = with_iptc_xmp(png_bytes)
    else:
        _png_chunks(png_bytes)  # a clear error for a non-PNG before c2pa's
    cert_pem = _read(config.cert_chain, "c2pa certificate chain")
    key_pem = _read(config.private_key, "c2pa private key")

    agent = {"name": "toile", "version": __version__}
    manifest: dict[str, Any] = {"title": "toile image", "format": "image/png", "assertions": [
        {"label": RECORD_LABEL, "data": record_json},
    ]}
    settings = {
        "builder": {
            "claim_generator_info": agent,
            "thumbnail": {"enabled": False},  # toile's PNG is the image; no JPEG copy inside
            # toile made the record: a "created" assertion, not one "gathered" from elsewhere
            "created_assertion_labels": ["c2pa.actions", RECORD_LABEL],
        },
        "trust": {"trust_config": _TRUST_CONFIG},  # c2pa-rs checks its own output after signing
        "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    }
    out = io.BytesIO()
    try:
        info = c2pa.C2paSignerInfo(config.algorithm.encode(), cert_pem, key_pem, config.tsa_url)
        with (
            c2pa.Context.from_dict(settings) as context,
            c2pa.Signer.from_info(info) as signer,
            c2pa.Builder(manifest, context=context) as builder,
        ):
            if ingredient is None:
                builder.set_intent(
                    c2pa.C2paBuilderIntent.CREATE,
                    c2pa.C2paDigitalSourceType.TRAINED_ALGORITHMIC_MEDIA,
                )
                # merged by c2pa-rs into the c2pa.created action the intent adds
                builder.add_action({
                    "action": "c2pa.created",
                    "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": agent,
                })
            else:
                fmt = _FORMATS.get(ingredient_format.lower().removeprefix("."), ingredient_format)
                builder.add_ingredient(
                    {"title": "input image", "relationship": "parentOf", "label": "input"},
                    fmt,
                    io.BytesIO(ingredient),
                )
                # EDIT: c2pa-rs adds c2pa.opened of the parentOf ingredient as the first action
                builder.set_intent(c2pa.C2paBuilderIntent.EDIT)
                builder.add_action({
                    "action": "c2pa.edited",
                    "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": agent,
                })
            builder.sign(signer, "image/png", io.BytesIO(png_bytes), out)
    except c2pa.C2paError as exc:
        raise CredentialsError(f"c2pa signing failed: {one_line(exc)}") from None
    return out.getvalue()


# -- verifying -------------------------------------------------------------------------------


@dataclass(frozen=True)
class C2paIngredient:
    """An ingredient of the manifest (toile's: the input image, ``parentOf``). If it carried
    content credentials of its own, ``has_manifest`` is True and ``errors`` lists what failed
    when they were validated at signing time (an untrusted signer left out); a broken input's
    credentials do not make the new manifest invalid, they are recorded in it."""

    title: str | None
    relationship: str | None
    format: str | None
    has_manifest: bool
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class C2paReport:
    """What :func:`verify` found. ``present`` False: the file has no C2PA manifest (not an
    error). ``state``: c2pa-rs's validation state, ``Invalid``, ``Valid`` or ``Trusted``;
    ``valid``: ``Valid`` or ``Trusted``; ``trusted``: ``Trusted`` (the signer chains to one of
    the trust anchors given). ``errors``: the failures that make it invalid, each
    ``"code: explanation"``; an untrusted signer is not among them but ``trusted`` is False and
    ``trust_note`` says why."""

    present: bool
    valid: bool = False
    trusted: bool = False
    state: str | None = None
    errors: list[str] = field(default_factory=list)
    trust_note: str | None = None
    signer: str | None = None  # the signing certificate's subject common name
    signer_organization: str | None = None
    issuer: str | None = None  # its issuer's common name
    signing_time: str | None = None  # from a timestamp authority, when one signed
    algorithm: str | None = None
    claim_generator: str | None = None  # "toile/0.1.0"
    actions: list[str] = field(default_factory=list)
    digital_source_type: str | None = None
    ingredients: list[C2paIngredient] = field(default_factory=list)
    record: dict[str, Any] | None = None  # the org.toile.generation assertion
    iptc_digital_source_type: str | None = None  # from the PNG's XMP (unsigned)

    def lines(self) -> list[str]:
        """Human-readable summary for ``toile verify``."""
        xmp = self.iptc_digital_source_type
        tail = [f"IPTC digital source type (XMP, unsigned): {xmp}"] if xmp else []
        if not self.present:
            return ["C2PA: no content credentials", *tail]
        if self.trusted:
            verdict = "valid, signer trusted"
        elif self.valid:
            verdict = f"valid signature, signer not trusted ({self.trust_note})"
        else:
            verdict = "INVALID"
        out = [f"C2PA: {verdict}"]
        out += [f"  error: {e}" for e in self.errors]
        signer = self.signer or "?"
        if self.signer_organization:
            signer += f" ({self.signer_organization})"
        out.append(f"  signed by: {signer}, issued by {self.issuer or '?'}")
        if self.signing_time:
            out.append(f"  signed at: {self.signing_time}")
        out.append(f"  claim generator: {self.claim_generator or '?'}")
        out.append(f"  actions: {', '.join(self.actions) or 'none'}")
        if self.digital_source_type:
            out.append(f"  digital source type: {self.digital_source_type}")
        for i in self.ingredients:
            own = ""
            if i.has_manifest:
                own = ", its own credentials INVALID" if i.errors else ", with its own credentials"
            out.append(f"  ingredient: {i.title} ({i.relationship}, {i.format}{own})")
            out += [f"    ingredient error: {e}" for e in i.errors]
        if self.record is not None:
            out.append(f"  toile record: {RECORD_LABEL} ({len(self.record)} fields)")
        return out + tail


def verify(
    data: bytes, fmt: str = "image/png", trust_anchors: str | Path | None = None
) -> C2paReport:
    """Read and validate the C2PA manifest in ``data`` (a PNG by default; any format c2pa-rs
    reads, by MIME type). ``trust_anchors``: PEM root certificates (text, or a path to a file)
    that make a signer ``trusted``. Nothing is fetched. A file c2pa-rs cannot parse is a
    one-line :class:`CredentialsError`; a file without a manifest is ``present=False``."""
    c2pa = _c2pa()
    fmt = _FORMATS.get(fmt.lower().removeprefix("."), fmt)
    is_png = fmt == "image/png"
    xmp = read_iptc_digital_source_type(data) if is_png else None  # also checks it is a PNG
    settings: dict[str, Any] = {
        "trust": {"trust_config": _TRUST_CONFIG},
        "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False, "verify_trust": True},
    }
    if trust_anchors is not None:
        pem = trust_anchors
        if isinstance(pem, Path) or "-----BEGIN" not in pem:
            pem = _read(Path(pem).expanduser(), "c2pa trust anchors").decode("utf-8", "replace")
        from cryptography import x509

        try:
            x509.load_pem_x509_certificates(pem.encode())
        except ValueError as exc:
            raise CredentialsError(
                f"c2pa trust anchors: not PEM certificates ({one_line(exc)})"
            ) from None
        settings["trust"]["user_anchors"] = pem
    try:
        with c2pa.Context.from_dict(settings) as context:
            reader = c2pa.Reader.try_create(fmt, io.BytesIO(data), context=context)
            if reader is None:
                return C2paReport(present=False, iptc_digital_source_type=xmp)
            with reader:
                store = json.loads(reader.json())
                try:
                    cr = json.loads(reader.crjson())
                except (c2pa.C2paError, ValueError):
                    cr = {}
    except c2pa.C2paError as exc:
        raise CredentialsError(f"c2pa cannot read this file: {one_line(exc)}") from None
    return _report(store, cr, xmp, trust_anchors is not None)


def _report(
    store: dict[str, Any], cr: dict[str, Any], xmp: str | None, anchors_given: bool
) -> C2paReport:
    label = store.get("active_manifest")
    manifest = store.get("manifests", {}).get(label) or {}
    state = store.get("validation_state")
    results = store.get("validation_results") or {}
    failures = list((results.get("activeManifest") or {}).get("failure") or [])
    if not results:  # older layouts: a flat validation_status list
        failures = list(store.get("validation_status") or [])
    for delta in results.get("ingredientDeltas") or []:  # ingredients re-checked on reading
        failures += (delta.get("validationDeltas") or {}).get("failure") or []
    errors = _errors(failures)
    untrusted = [f for f in failures if f.get("code") == UNTRUSTED]
    valid = state in ("Valid", "Trusted") and not errors
    trusted = state == "Trusted"
    note = None
    if valid and not trusted:
        if not untrusted:
            note = "trust not checked"
        elif anchors_given:
            note = "its certificate does not chain to the trust anchors given"
        else:
            note = "no trust anchors given"

    actions: list[str] = []
    source_type = None
    record = None
    for assertion in manifest.get("assertions") or []:
        if assertion.get("label", "").startswith("c2pa.actions"):
            for action in (assertion.get("data") or {}).get("actions") or []:
                actions.append(str(action.get("action")))
                source_type = source_type or action.get("digitalSourceType")
        elif assertion.get("label") == RECORD_LABEL and isinstance(assertion.get("data"), dict):
            record = assertion["data"]

    infos = manifest.get("claim_generator_info") or []
    if isinstance(infos, dict):
        infos = [infos]
    generator = manifest.get("claim_generator")
    if infos and infos[0].get("name"):
        generator = "/".join(str(p) for p in (infos[0]["name"], infos[0].get("version")) if p)

    sig = manifest.get("signature_info") or {}
    signer, issuer, org = sig.get("common_name"), None, sig.get("issuer")
    for m in cr.get("manifests") or []:  # crJSON has the certificate's subject and issuer
        if m.get("label") == label:
            cert = (m.get("signature") or {}).get("certificateInfo") or {}
            subject = cert.get("subject") or {}
            signer = subject.get("CN") or signer
            org = subject.get("O") or org
            issuer = (cert.get("issuer") or {}).get("CN") or (cert.get("issuer") or {}).get("O")
    ingredients = [
        C2paIngredient(
            title=i.get("title"),
            relationship=i.get("relationship"),
            format=i.get("format"),
            has_manifest=bool(i.get("active_manifest") or i.get("manifest_data")),
            errors=_errors(
                ((i.get("validation_results") or {}).get("activeManifest") or {}).get("failure")
                or i.get("validation_status")
                or []
            ),
        )
        for i in manifest.get("ingredients") or []
    ]
    return C2paReport(
        present=True,
        valid=valid,
        trusted=trusted,
        state=state,
        errors=errors,
        trust_note=note,
        signer=signer,
        signer_organization=org,
        issuer=issuer,
        signing_time=sig.get("time"),
        algorithm=sig.get("alg"),
        claim_generator=generator,
        actions=actions,
        digital_source_type=source_type,
        ingredients=ingredients,
        record=record,
        iptc_digital_source_type=xmp,
    )


def _errors(failures: list[dict[str, Any]]) -> list[str]:
    """``code: explanation`` of each failure but an untrusted signer (reported as trust)."""
    return [
        f"{f.get('code')}: {f.get('explanation') or ''}".rstrip(": ")
        for f in failures
        if f.get("code") != UNTRUSTED
    ]


def _c2pa() -> ModuleType:
    try:
        import c2pa
    except ImportError as exc:
        raise CredentialsError(
            f"content credentials need the c2pa-python package ({one_line(exc)}); "
            "pip install c2pa-python"
        ) from None
    return c2pa
