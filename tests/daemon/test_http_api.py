"""The peer HTTP API's routes as built (docs/http-api.md), through real daemons on loopback.

Shared release packs (one pack per release step, for every school, at an
immutable URL), objects by hash, the latest signed release, and TLS served by
harmonicd itself with a certificate made here.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import http.server
import ipaddress
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harmonicd import config as config_mod
from harmonicd.core.codec import pack_msg
from harmonicd.core.objects import TREE, decode_tree
from harmonicd.errors import ConfigError
from harmonicd.peer import UpstreamError, client
from harmonicd.services import shared
from tests.conftest import Server, make_master, make_school, tree_digest, write_tree
from tests.daemon.conftest import DaemonProc
from tests.daemon.test_online import CuttingProxy, free_port, no_auto_sync

IMMUTABLE = "public, max-age=31536000, immutable"


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sync(s: Server) -> str:
    p = s.ctl("sync", "--wait", check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout


def shared_gets(proxy: CuttingProxy) -> list[str]:
    return [h.split(" ")[1] for h in proxy.heads if h.startswith("GET /v1/shared/")]


@pytest.fixture
def two_schools(tmp_path: Path) -> Iterator[tuple[Server, Server, Server, CuttingProxy, int]]:
    """A master listening on loopback, two schools syncing through a recording proxy."""
    port = free_port()
    with CuttingProxy(port) as proxy:
        m, key = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
        schools = []
        for name in ("school-1", "school-2"):
            s = make_school(tmp_path, m, key, name, "--upstream", f"http://127.0.0.1:{proxy.port}")
            no_auto_sync(s)
            schools.append(s)
        yield m, schools[0], schools[1], proxy, port


def test_two_schools_get_one_shared_pack(tmp_path: Path, start_daemon: Callable[..., DaemonProc],
                                         two_schools: tuple[Server, Server, Server, CuttingProxy, int]) -> None:
    m, s1, s2, proxy, port = two_schools
    src = tmp_path / "content"
    files = {f"lesson{i}.html": f"<p>lesson {i}</p>\n".encode() * 200 for i in range(20)}
    files["video.bin"] = os.urandom(400_000)
    write_tree(src, files)
    m.ctl("publish", "content", str(src))
    start_daemon(m)
    start_daemon(s1)
    start_daemon(s2)
    assert "content release 1" in sync(s1)
    assert "content release 1" in sync(s2)
    assert tree_digest(s1.deploy / "content") == tree_digest(src) == tree_digest(s2.deploy / "content")

    # Both schools fetched the very same URL: the pack was built once.
    urls = shared_gets(proxy)
    assert len(urls) == 2, urls
    assert urls[0] == urls[1], urls
    index = json.loads((m.state / "shared" / "index.json").read_text())
    assert len(index) == 1
    (entry,) = index.values()
    assert entry["from"] is None
    assert entry["seq"] == 1
    digest = entry["files"][0]["sha256"]
    assert urls[0] == f"/v1/shared/{digest}/{entry['files'][0]['name']}"
    # Each school also got its own, private pack.
    private = sorted(h.split(" ")[1] for h in proxy.heads if h.startswith("GET /v1/packs/"))
    assert [p.split("/")[3] for p in private] == ["school-1", "school-2"]

    # The shared pack's URL: immutable, strong ETag (the hash of its bytes), Range.
    status, h, body = get(port, urls[0])
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == digest
    assert h["etag"] == f'"{digest}"'
    assert h["cache-control"] == IMMUTABLE
    assert h["accept-ranges"] == "bytes"
    status, h, part = get(port, urls[0], {"Range": "bytes=100-199"})
    assert (status, part, h["content-range"]) == (206, body[100:200], f"bytes 100-199/{len(body)}")
    status, h, part = get(port, urls[0], {"Range": "bytes=-10"})
    assert (status, part) == (206, body[-10:])
    status, h, part = get(port, urls[0], {"Range": "bytes=100-", "If-Range": '"other"'})
    assert (status, part) == (200, body), "If-Range with another ETag gets the whole body"
    assert get(port, urls[0], {"Range": f"bytes={len(body)}-"})[0] == 416
    status, h, part = get(port, urls[0], {"If-None-Match": f'"{digest}"'})
    assert (status, part, h["etag"]) == (304, b"", f'"{digest}"')
    status, h, part = get(port, urls[0], method="HEAD")
    assert (status, part, int(h["content-length"])) == (200, b"", len(body))
    assert get(port, f"/v1/shared/{'0' * 64}/{entry['files'][0]['name']}")[0] == 404
    assert get(port, "/v1/shared/../index.json")[0] == 404
    # The per-school pack is not for caches.
    assert get(port, private[0])[1]["cache-control"] == "private, no-store"

    # The same shared pack applied again (a second copy in the downloads folder,
    # as a cut sync leaves it) is recognised and changes nothing.
    (s1.state / "online").mkdir(exist_ok=True)
    (s1.state / "online" / entry["files"][0]["name"]).write_bytes(body)
    assert "nothing new" in sync(s1)
    assert not list((s1.state / "online").iterdir())
    assert tree_digest(s1.deploy / "content") == tree_digest(src)

    # Release 2: a delta from release 1, again one pack for both; release 1's is dropped.
    (src / "lesson3.html").write_bytes(b"<p>changed</p>\n")
    m.ctl("publish", "content", str(src))
    assert "content release 2" in sync(s1)
    assert "content release 2" in sync(s2)
    urls2 = shared_gets(proxy)[2:]
    assert len(urls2) == 2
    assert urls2[0] == urls2[1] != urls[0]
    index = json.loads((m.state / "shared" / "index.json").read_text())
    (entry2,) = index.values()
    assert entry2["seq"] == 2
    assert entry2["from"] is not None
    assert entry2["files"][0]["size"] < len(body) / 10, "release 2 should travel as a small delta"
    assert not (m.state / "shared" / digest).exists()
    assert get(port, urls[0])[0] == 404
    assert tree_digest(s1.deploy / "content") == tree_digest(src) == tree_digest(s2.deploy / "content")
    s1.ctl("verify")
    s2.ctl("verify")


def test_cut_per_school_pack_resumes(tmp_path: Path, start_daemon: Callable[..., DaemonProc],
                                     two_schools: tuple[Server, Server, Server, CuttingProxy, int]) -> None:
    """The private pack (a collection for one school) resumes with Range like a shared one."""
    m, s1, _s2, proxy, _port = two_schools
    src = tmp_path / "letter"
    write_tree(src, {"scan.bin": os.urandom(600_000)})
    m.ctl("publish", "letter", str(src), "--for", "school-1")
    start_daemon(m)
    start_daemon(s1)
    proxy.cut_after = 250_000
    p = s1.ctl("sync", "--wait", check=False)
    assert p.returncode == 1
    assert "cut off at" in p.stderr, p.stderr
    sidecar = json.loads(next((s1.state / "online").glob("*.hpk.json")).read_text())
    assert sidecar["shared"] is False
    assert sidecar["url"].startswith("/v1/packs/school-1/")
    have = next((s1.state / "online").glob("*.part")).stat().st_size
    assert "letter release 1" in sync(s1)
    assert any(h.startswith("GET /v1/packs/school-1/") and f"range: bytes={have}-" in h.lower()
               for h in proxy.heads), proxy.heads
    assert not shared_gets(proxy)
    assert tree_digest(s1.deploy / "letter") == tree_digest(src)


def test_what_goes_in_a_shared_pack(tmp_path: Path) -> None:
    """Collections for everyone the school lacks go shared; a school that holds part
    of an unfinished release of one, and collections for one school, stay private."""
    m, key = make_master(tmp_path)
    make_school(tmp_path, m, key, "school-1")
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"a\n" * 1000})
    m.ctl("publish", "content", str(src))
    m.ctl("publish", "letter", str(src), "--for", "school-1")
    with m.store() as store:
        got = shared.for_school(store, "school-1")
        assert got.collections == {"content"}
        assert len(got.files) == 1
        assert got.built == 1
        again = shared.for_school(store, "school-1")
        assert (again.files, again.built) == (got.files, 0), "built once, then taken from STATE/shared"
        root = store.db.collection("content").root  # type: ignore[union-attr]
        have = {"held": {}, "pending": [["master-1/content", 1, root]], "partial": b"\x01" * 32}
        store.db.peer_seen("school-1", int(time.time()), "online", pack_msg(have))
        assert shared.for_school(store, "school-1").collections == frozenset()
    # A new release: gc drops the shared pack of the old one.
    old = Path(got.files[0]).parent
    assert old.is_dir()
    write_tree(src, {"b.txt": b"b\n"})
    m.ctl("publish", "content", str(src))
    m.ctl("gc")
    assert not old.exists()
    assert json.loads((m.state / "shared" / "index.json").read_text()) == {}


def test_objects_by_hash(tmp_path: Path, start_daemon: Callable[..., DaemonProc],
                         two_schools: tuple[Server, Server, Server, CuttingProxy, int]) -> None:
    m, _s1, _s2, _proxy, port = two_schools
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"hello\n"})
    m.ctl("publish", "content", str(src))
    letter = tmp_path / "letter"
    write_tree(letter, {"private.txt": b"for school-1 only\n"})
    m.ctl("publish", "letter", str(letter), "--for", "school-1")
    start_daemon(m)
    base = f"http://127.0.0.1:{port}"
    with m.store(lock=False) as store:
        root = store.db.collection("content").root  # type: ignore[union-attr]
        private_root = store.db.collection("letter@school-1").root  # type: ignore[union-attr]
    assert root is not None
    assert private_root is not None
    kind, payload = client.fetch_object(base, root)
    assert kind == TREE
    assert [e.name for e in decode_tree(payload)] == ["a.txt"]
    status, h, body = get(port, f"/v1/objects/{root.hex()}")
    assert (status, body) == (200, bytes((TREE,)) + payload)
    assert h["etag"] == f'"{root.hex()}"'
    assert h["cache-control"] == IMMUTABLE
    assert get(port, f"/v1/objects/{root.hex()}", {"Range": "bytes=0-0"})[2] == bytes((TREE,))
    with pytest.raises(UpstreamError, match="404"):
        client.fetch_object(base, b"\x07" * 32)
    # Held, but of a collection for one school: not served by hash.
    assert get(port, f"/v1/objects/{private_root.hex()}")[0] == 404
    assert get(port, "/v1/objects/not-hex")[0] == 404

    # Whoever serves it, the client checks the bytes against the id.
    class Liar(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = bytes((TREE,)) + payload + b"!"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    liar = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UpstreamError, match="does not match its id"):
            client.fetch_object(f"http://127.0.0.1:{liar.server_address[1]}", root)
    finally:
        liar.shutdown()


def test_latest_release(tmp_path: Path, start_daemon: Callable[..., DaemonProc],
                        two_schools: tuple[Server, Server, Server, CuttingProxy, int]) -> None:
    m, s1, _s2, _proxy, port = two_schools
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"one\n"})
    m.ctl("publish", "content", str(src))
    write_tree(src, {"a.txt": b"two\n"})
    m.ctl("publish", "content", str(src))
    m.ctl("publish", "letter", str(src), "--for", "school-1")
    start_daemon(m)
    base = f"http://127.0.0.1:{port}"
    master_key = s1.cfg().master_key
    assert master_key is not None
    sr = client.fetch_release(base, "content", master_key)
    with m.store(lock=False) as store:
        assert (sr.release.seq, sr.release.root) == (2, store.db.collection("content").root)  # type: ignore[union-attr]
    status, h, body = get(port, "/v1/releases/content")
    assert status == 200
    assert h["cache-control"] == "public, max-age=60"
    assert json.loads(body)["seq"] == 2
    assert get(port, "/v1/releases/content", {"If-None-Match": h["etag"]})[0] == 304
    with pytest.raises(UpstreamError, match="not a release signed by the master"):
        client.fetch_release(base, "content", b"\x01" * 32)
    for name in ("nothing-here", "letter@school-1"):  # unknown, and one school's own collection
        with pytest.raises(UpstreamError, match="404"):
            client.fetch_release(base, name, master_key)


# --------------------------------------------------------------------------- TLS


def make_cert(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "harmonic test master")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def set_keys(server: Server, section: str, **keys: str) -> None:
    text = server.config.read_text()
    lines = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    if f"[{section}]\n" not in text:
        text += f"\n[{section}]\n"
    server.config.write_text(text.replace(f"[{section}]\n", f"[{section}]\n{lines}", 1))


def test_tls_served_by_harmonicd(tmp_path: Path, start_daemon: Callable[..., DaemonProc]) -> None:
    cert, key = make_cert(tmp_path)
    port = free_port()
    m, mkey = make_master(tmp_path, "master-1", "--listen", f"127.0.0.1:{port}")
    set_keys(m, "server", tls_cert=str(cert), tls_key=str(key))
    good = make_school(tmp_path, m, mkey, "school-1", "--upstream", f"https://127.0.0.1:{port}")
    set_keys(good, "upstream", ca_file=str(cert))
    bad = make_school(tmp_path, m, mkey, "school-2", "--upstream", f"https://127.0.0.1:{port}")
    for s in (good, bad):
        no_auto_sync(s)
    src = tmp_path / "content"
    write_tree(src, {"a.txt": b"over TLS\n"})
    m.ctl("publish", "content", str(src))
    start_daemon(m)
    start_daemon(good)
    d = start_daemon(bad)
    assert "content release 1" in sync(good)
    assert tree_digest(good.deploy / "content") == tree_digest(src)
    assert client.health(f"https://127.0.0.1:{port}", client.tls_context(str(cert)))["id"] == "master-1"
    # Plain http to the TLS port gets nowhere; a school that does not trust the certificate says why.
    with pytest.raises(UpstreamError):
        client.health(f"http://127.0.0.1:{port}")
    p = bad.ctl("sync", "--wait", check=False)
    assert p.returncode == 1
    assert "TLS certificate not accepted" in p.stderr, p.stderr
    assert "self-signed" in p.stderr, p.stderr
    assert "TLS" in (d.status()["upstream"]["last_error"] or "")
    assert not (bad.deploy / "content").exists()


def test_tls_config_errors(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    _other_cert, other_key = make_cert(tmp_path, "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    m, _key = make_master(tmp_path, "master-1", "--listen", "127.0.0.1:0")
    plain = m.config.read_text()

    def error(section: str, **keys: str) -> str:
        m.config.write_text(plain)
        set_keys(m, section, **keys)
        with pytest.raises(ConfigError) as exc:
            config_mod.load(str(m.config))
        msg = str(exc.value)
        assert "\n" not in msg
        return msg

    assert "server.tls_key: is needed too" in error("server", tls_cert=str(cert))
    assert "server.tls_cert: is needed too" in error("server", tls_key=str(key))
    assert "server.tls_cert: cannot read" in error("server", tls_cert=str(tmp_path / "nope.crt"), tls_key=str(key))
    assert "server.tls_cert:" in error("server", tls_cert=str(junk), tls_key=str(key))
    assert "does not belong to the certificate" in error("server", tls_cert=str(cert), tls_key=str(other_key))
    assert "upstream.ca_file: cannot read" in error("upstream", ca_file=str(tmp_path / "nope.crt"))
    assert "upstream.ca_file:" in error("upstream", ca_file=str(junk))
    m.config.write_text(plain)
    set_keys(m, "server", tls_cert=str(cert), tls_key=str(key))
    assert config_mod.load(str(m.config)).tls_cert == str(cert)
    assert isinstance(client.tls_context(str(cert)), ssl.SSLContext)


def test_shared_download_checked_against_its_hash(tmp_path: Path) -> None:
    """A cache that kept broken bytes under a shared pack's URL: the download is
    refused by its SHA-256 and nothing of it is kept (the school does not apply it)."""
    data = os.urandom(5000)

    class Cache(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    cache = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cache)
    threading.Thread(target=cache.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{cache.server_address[1]}"
    name = "master-1-20261127T081200-0123456789ab-v001.hpk"
    folder = tmp_path / "online"
    try:
        wrong = hashlib.sha256(b"the real pack").hexdigest()
        pack = {"name": name, "size": len(data), "url": f"/v1/shared/{wrong}/{name}", "shared": True, "sha256": wrong}
        with pytest.raises(UpstreamError, match="does not match the sha256"):
            client.download(base, pack, str(folder))
        assert not list(folder.iterdir())
        right = hashlib.sha256(data).hexdigest()
        pack.update(sha256=right, url=f"/v1/shared/{right}/{name}")
        assert Path(client.download(base, pack, str(folder))).read_bytes() == data
    finally:
        cache.shutdown()
