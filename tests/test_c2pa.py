"""C2PA content credentials and the IPTC digital source type (toile.safety.c2pa_credentials).

A fixture builds a certificate chain with ``cryptography``: a root CA, an intermediate CA and an
EC P-256 signing certificate with the extensions c2pa-rs's certificate profile asks for
(critical key usage ``digitalSignature``, extended key usage ``emailProtection``, subject and
authority key identifiers, not self-signed). Signing and reading go through c2pa-rs itself.
"""

from __future__ import annotations

import datetime as dt
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("c2pa")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import toile
from toile.errors import ToileError
from toile.safety.c2pa_credentials import (
    TRAINED_ALGORITHMIC_MEDIA,
    XMP_KEY,
    C2paConfig,
    CredentialsError,
    load_c2pa_config,
    read_iptc_digital_source_type,
    sign_png,
    verify,
    with_iptc_xmp,
)

RECORD = {
    "model_id": "toile-mini",
    "prompt": "a red circle left of a blue square",
    "seed": 2**63 - 1,
    "guidance": 7.5,
    "steps": 20,
    "loras": [{"name": "pink", "scale": 0.8}],
    "outpaint": None,
    "safety": {},
}


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "toile tests"),
    ])


def _cert(subject, key, issuer, issuer_key, *, ca: bool, path_length=None, leaf_eku=None,
          expired=False):
    now = dt.datetime.now(dt.UTC) - (dt.timedelta(days=60) if expired else dt.timedelta())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    usage = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )
    if ca:
        usage.update(key_cert_sign=True, crl_sign=True)
    else:
        usage.update(digital_signature=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(leaf_eku), critical=False)
    builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def build_chain(
    folder: Path, prefix: str = "toile test", eku=ExtendedKeyUsageOID.EMAIL_PROTECTION
) -> dict[str, Path]:
    """root -> intermediate -> signer; writes chain.pem (signer + intermediate), key.pem, root.pem
    and, for the error tests, signers that are self-signed, expired, or of the wrong usage."""
    folder.mkdir(parents=True, exist_ok=True)
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert(_name(f"{prefix} root"), root_key, _name(f"{prefix} root"), root_key,
                 ca=True, path_length=1)
    inter = _cert(_name(f"{prefix} intermediate"), inter_key, root.subject, root_key,
                  ca=True, path_length=0)
    leaf = _cert(_name(f"{prefix} signer"), leaf_key, inter.subject, inter_key, ca=False,
                 leaf_eku=[eku])
    selfsigned = _cert(_name("self"), leaf_key, _name("self"), leaf_key, ca=False,
                       leaf_eku=[eku])
    expired = _cert(leaf.subject, leaf_key, inter.subject, inter_key, ca=False, leaf_eku=[eku],
                    expired=True)
    server = _cert(leaf.subject, leaf_key, inter.subject, inter_key, ca=False,
                   leaf_eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    paths = {name: folder / f"{name}.pem" for name in
             ("chain", "key", "root", "selfsigned", "expired", "server_auth", "encrypted_key",
              "other_key")}
    paths["chain"].write_bytes(_pem(leaf) + _pem(inter))
    paths["expired"].write_bytes(_pem(expired) + _pem(inter))
    paths["server_auth"].write_bytes(_pem(server) + _pem(inter))
    paths["key"].write_bytes(_key_pem(leaf_key))
    paths["root"].write_bytes(_pem(root))
    paths["selfsigned"].write_bytes(_pem(selfsigned))
    paths["encrypted_key"].write_bytes(_key_pem(leaf_key, b"secret"))
    paths["other_key"].write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    return paths


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_chain(tmp_path_factory.mktemp("c2pa-certs"))


@pytest.fixture(scope="module")
def config(certs) -> C2paConfig:
    return load_c2pa_config(certs["chain"], certs["key"])


def _png(color=(200, 30, 30), size=64, **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG", **save)
    return buf.getvalue()


def _chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], pos, pos + 12 + length))
        pos += 12 + length
    return out


def test_sign_and_verify_created(config):
    png = _png()
    signed = sign_png(png, RECORD, config)
    report = verify(signed)

    assert report.present and report.valid, report.errors
    assert report.errors == []
    assert report.state == "Valid"
    # c2pa-rs ships no trust anchors: a valid signature from a signer nobody vouched for
    assert not report.trusted and report.trust_note == "no trust anchors given"
    assert report.signer == "toile test signer"
    assert report.issuer == "toile test intermediate"
    assert report.signer_organization == "toile tests"
    assert report.algorithm is not None and report.algorithm.lower() == "es256"
    assert report.claim_generator == f"toile/{toile.__version__}"
    assert report.actions == ["c2pa.created"]
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert report.ingredients == []
    assert report.record == RECORD
    assert report.iptc_digital_source_type == TRAINED_ALGORITHMIC_MEDIA

    image = Image.open(io.BytesIO(signed))
    assert XMP_KEY in image.info
    assert image.convert("RGB").tobytes() == Image.open(io.BytesIO(png)).convert("RGB").tobytes()
    kinds = [kind for kind, _, _ in _chunks(signed)]
    assert b"caBX" in kinds and kinds.index(b"iTXt") < kinds.index(b"IDAT")
    lines = report.lines()
    assert lines[0].startswith("C2PA: valid signature, signer not trusted")
    assert any("toile test signer" in line for line in lines)


def test_trust_anchors(config, certs, tmp_path):
    signed = sign_png(_png(), RECORD, config)
    report = verify(signed, trust_anchors=certs["root"])
    assert report.trusted and report.valid and report.state == "Trusted"
    assert report.trust_note is None and report.errors == []
    assert report.lines()[0] == "C2PA: valid, signer trusted"
    # the PEM text works as well as a path
    assert verify(signed, trust_anchors=certs["root"].read_text()).trusted

    other = build_chain(tmp_path / "other", prefix="someone else")
    report = verify(signed, trust_anchors=other["root"])
    assert report.valid and not report.trusted and report.state == "Valid"
    assert report.trust_note == "its certificate does not chain to the trust anchors given"

    for bad in (certs["key"], "-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----"):
        with pytest.raises(CredentialsError, match="c2pa trust anchors: not PEM certificates"):
            verify(signed, trust_anchors=bad)


def test_document_signing_certificate(tmp_path):
    # c2pa-rs 0.91's default EKU list would call this signer invalid ("missing required EKU");
    # toile passes C2PA's full list when it signs and reads
    paths = build_chain(tmp_path, eku=x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36"))
    signed = sign_png(_png(), RECORD, load_c2pa_config(paths["chain"], paths["key"]))
    report = verify(signed, trust_anchors=paths["root"])
    assert report.valid and report.trusted, report.errors


def test_edit_lists_the_input_as_ingredient(config):
    source = _png((10, 10, 240))
    signed = sign_png(_png((10, 200, 10)), RECORD, config, ingredient=source)
    report = verify(signed)
    assert report.valid, report.errors
    assert report.actions == ["c2pa.opened", "c2pa.edited"]
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert [(i.title, i.relationship, i.format, i.has_manifest) for i in report.ingredients] == [
        ("input image", "parentOf", "image/png", False)
    ]
    assert report.record == RECORD

    # an input that has credentials of its own (a toile output edited again): kept, still valid
    again = sign_png(_png((90, 90, 90)), {"step": 2}, config, ingredient=signed)
    report = verify(again)
    assert report.valid, report.errors
    assert report.actions == ["c2pa.opened", "c2pa.edited"]
    assert report.ingredients[0].has_manifest
    assert report.record == {"step": 2}


def _tamper(png: bytes) -> bytes:
    """Change one pixel byte of a PNG saved with ``compress_level=0`` (stored deflate blocks:
    IDAT holds the raw scanlines), keeping the PNG well formed (zlib checksum and chunk CRC)."""
    out = bytearray(png)
    kind, start, end = next(c for c in _chunks(png) if c[0] == b"IDAT")
    data = bytearray(out[start + 8 : end - 4])
    data[len(data) // 2] ^= 0x40
    data[-4:] = struct.pack(">I", zlib.adler32(_stored_deflate_payload(bytes(data))))
    out[start + 8 : end - 4] = data
    out[end - 4 : end] = struct.pack(">I", zlib.crc32(kind + bytes(data)))
    return bytes(out)


def test_tampered_pixel_is_invalid(config):
    tampered = _tamper(sign_png(_png(compress_level=0), RECORD, config))
    pixels = Image.open(io.BytesIO(tampered)).convert("RGB").tobytes()
    assert pixels != Image.open(io.BytesIO(_png())).convert("RGB").tobytes()

    report = verify(tampered)
    assert report.present and not report.valid and not report.trusted
    assert report.state == "Invalid"
    assert any(e.startswith("assertion.dataHash.mismatch") for e in report.errors), report.errors
    assert report.lines()[0] == "C2PA: INVALID"


def test_input_with_broken_credentials_is_recorded(config):
    broken = _tamper(sign_png(_png(compress_level=0), RECORD, config))
    report = verify(sign_png(_png(), RECORD, config, ingredient=broken))
    assert report.valid, report.errors  # the new claim is sound; it records the input's state
    (ingredient,) = report.ingredients
    assert ingredient.has_manifest
    assert any(e.startswith("assertion.dataHash.mismatch") for e in ingredient.errors)
    assert any("its own credentials INVALID" in line for line in report.lines())


def _stored_deflate_payload(zdata: bytes) -> bytes:
    """The bytes inside a zlib stream of stored (uncompressed) deflate blocks."""
    out, pos = bytearray(), 2  # skip the zlib header
    while True:
        final = zdata[pos] & 1
        length = struct.unpack("<H", zdata[pos + 1 : pos + 3])[0]
        out += zdata[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if final:
            return bytes(out)


def test_unsigned_png_has_no_credentials():
    report = verify(_png())
    assert not report.present and not report.valid and report.iptc_digital_source_type is None
    assert report.lines() == ["C2PA: no content credentials"]
    report = verify(with_iptc_xmp(_png()))
    assert not report.present
    assert report.iptc_digital_source_type == TRAINED_ALGORITHMIC_MEDIA


@pytest.mark.parametrize("data", [b"", b"not a png at all", "truncated"])
def test_corrupt_file_is_one_line_error(config, data):
    if data == "truncated":
        data = sign_png(_png(), RECORD, config)[:300]
    with pytest.raises(ToileError) as info:
        verify(data)
    assert "\n" not in str(info.value)


def test_corrupt_jpeg_goes_through_c2pa(config):
    with pytest.raises(CredentialsError, match="c2pa cannot read this file") as info:
        verify(b"\xff\xd8\xff garbage", fmt="image/jpeg")
    assert "\n" not in str(info.value)


def test_xmp_keeps_other_chunks_and_replaces_its_own():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("toile", '{"seed": 1}')
    info.add_itxt(XMP_KEY, "<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=info)
    png = buf.getvalue()
    assert read_iptc_digital_source_type(png) is None

    out = with_iptc_xmp(png)
    assert read_iptc_digital_source_type(out) == TRAINED_ALGORITHMIC_MEDIA
    image = Image.open(io.BytesIO(out))
    assert image.info["toile"] == '{"seed": 1}'
    assert "Iptc4xmpExt:DigitalSourceType" in image.info[XMP_KEY]
    assert [kind for kind, _, _ in _chunks(out)].count(b"iTXt") == 1
    assert with_iptc_xmp(out) == out  # idempotent
    image.load()  # CRCs and data intact


def test_compressed_xmp_is_read_within_bounds():
    from PIL.PngImagePlugin import PngInfo

    from toile.safety.c2pa_credentials import iptc_xmp_packet

    def png_with(xmp: str) -> bytes:
        info = PngInfo()
        info.add_itxt(XMP_KEY, xmp, zip=True)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=info)
        return buf.getvalue()

    assert read_iptc_digital_source_type(png_with(iptc_xmp_packet())) == TRAINED_ALGORITHMIC_MEDIA
    bomb = png_with(iptc_xmp_packet() + " " * (16 << 20))  # 16 MB of spaces, ~16 kB zipped
    assert len(bomb) < 1 << 20
    assert read_iptc_digital_source_type(bomb) is None


def test_xmp_after_signing_is_refused(config):
    with pytest.raises(CredentialsError, match="add the XMP before signing"):
        with_iptc_xmp(sign_png(_png(), RECORD, config))


def test_sign_without_xmp(config):
    report = verify(sign_png(_png(), RECORD, config, add_xmp=False))
    assert report.valid and report.iptc_digital_source_type is None


def test_record_must_be_json(config):
    with pytest.raises(CredentialsError, match="not plain JSON"):
        sign_png(_png(), {"x": float("nan")}, config)
    with pytest.raises(CredentialsError, match="not plain JSON"):
        sign_png(_png(), {"x": object()}, config)


def test_config_implies_the_algorithm(certs):
    config = load_c2pa_config(certs["chain"], certs["key"])
    assert config.algorithm == "es256" and config.tsa_url is None
    assert config.cert_chain == certs["chain"]


@pytest.mark.parametrize(
    ("cert", "key", "kwargs", "message"),
    [
        ("missing", "key", {}, "c2pa certificate chain: no such file"),
        ("chain", "missing", {}, "c2pa private key: no such file"),
        ("key", "key", {}, "not PEM certificates"),
        ("chain", "chain", {}, "not a PEM private key"),
        ("chain", "encrypted_key", {}, "is encrypted"),
        ("chain", "other_key", {}, "is not the key of the first certificate"),
        ("selfsigned", "key", {}, "self-signed"),
        ("expired", "key", {}, "not now"),
        ("server_auth", "key", {}, "include none C2PA accepts"),
        ("chain", "key", {"algorithm": "ps256"}, "does not match the private key"),
        ("chain", "key", {"algorithm": "md5"}, "is not one of"),
        ("chain", "key", {"tsa_url": "ftp://tsa"}, "must be http"),
        ("empty", "key", {}, "is empty"),
        ("folder", "key", {}, "is a folder"),
    ],
)
def test_bad_config_is_one_line_error(certs, tmp_path, cert, key, kwargs, message):
    paths = dict(certs, missing=tmp_path / "nope.pem", empty=tmp_path / "empty.pem",
                 folder=tmp_path)
    paths["empty"].write_text("\n")
    with pytest.raises(ToileError, match=message) as info:
        load_c2pa_config(paths[cert], paths[key], **kwargs)
    assert "\n" not in str(info.value)


def test_sign_reports_files_gone_since_load(certs, tmp_path):
    config = C2paConfig(tmp_path / "gone.pem", certs["key"])
    with pytest.raises(CredentialsError, match="no such file") as info:
        sign_png(_png(), RECORD, config)
    assert "\n" not in str(info.value)


