"""TLS, mutual TLS and restricted protocols on the KServe gRPC port, as Triton's flags do them,
checked with tritonclient against a real server; TLS on the HTTP and OpenAI doors; a shared etcd
with its own TLS, client certificates and users; what the KV transport listens on."""
import asyncio
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import gevent.ssl
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from pdserve_testing.harness import PdServer, add_model, config_text, etcd_records, inputs
from pdserve.common.etcd import EtcdClient, EtcdConfigError, EtcdRefused, EtcdSecurity, parse_endpoints
from pdserve.common.etcd_server import EtcdProcess
from pdserve.frontend.security import SecurityConfigError, server_ssl_context

GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 4}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("certs")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=pdserve-test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext")
    return {n: str(d / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def generate_text(client) -> str:
    return client.infer("agg", inputs("def f", False, GREEDY)).as_numpy("text_output")[0].decode()


def test_tls_with_the_root_cert_works_and_plaintext_is_refused(repo, small_model, certs):
    add_model(repo, "agg", small_model, config_text())
    server = PdServer(repo, extra_args=["--grpc-use-ssl", "--grpc-server-cert", certs["server.pem"],
                                        "--grpc-server-key", certs["server.key"]],
                      client_args={"ssl": True, "root_certificates": certs["ca.pem"]}).start()
    try:
        server.wait_ready("agg")
        assert generate_text(server.client).startswith("def f")
        plain = grpcclient.InferenceServerClient(server.url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live()
        plain.close()
    finally:
        server.stop()


def test_mutual_tls_needs_a_client_certificate(repo, small_model, certs):
    add_model(repo, "agg", small_model, config_text())
    mutual = {"ssl": True, "root_certificates": certs["ca.pem"], "private_key": certs["client.key"],
              "certificate_chain": certs["client.pem"]}
    server = PdServer(repo, extra_args=["--grpc-use-ssl-mutual=true", "--grpc-server-cert", certs["server.pem"],
                                        "--grpc-server-key", certs["server.key"], "--grpc-root-cert", certs["ca.pem"]],
                      client_args=mutual).start()
    try:
        server.wait_ready("agg")
        assert generate_text(server.client).startswith("def f")
        anonymous = grpcclient.InferenceServerClient(server.url, ssl=True, root_certificates=certs["ca.pem"])
        with pytest.raises(InferenceServerException):
            anonymous.is_server_live()
        anonymous.close()
    finally:
        server.stop()


def test_restricted_protocols_need_their_header(repo, small_model):
    add_model(repo, "agg", small_model, config_text())
    server = PdServer(repo, extra_args=["--grpc-restricted-protocol=model-config,statistics:admin-key=s3cret"]).start()
    try:
        server.wait_ready("agg")
        for call in (lambda **kw: server.client.get_model_config("agg", **kw),
                     lambda **kw: server.client.get_inference_statistics("agg", **kw)):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            assert "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'" in info.value.message()
            with pytest.raises(InferenceServerException):
                call(headers={"triton-grpc-protocol-admin-key": "wrong"})
            call(headers={"triton-grpc-protocol-admin-key": "s3cret"})
        assert generate_text(server.client).startswith("def f")   # inference is not restricted
        assert server.client.is_server_ready()
    finally:
        server.stop()


# --- a shared etcd with its own TLS, client certificates and users -------------------------------

ETCD_PASSWORD = "pd-etcd-secret"


def etcd_auth_on(endpoint: str, security, user: str, password: str) -> None:
    """etcd's own authentication, as `etcdctl user add root; role add; user grant-role; auth enable`
    would set it: root, and a user allowed to read and write the /pdserve/ keys only."""
    from pyetcd import etcdrpc

    async def setup():
        client = EtcdClient([endpoint], security)
        auth = etcdrpc.AuthStub(client.channel)
        await auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password="root-" + password))
        await auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name="pdserve"))
        await auth.RoleGrantPermission(etcdrpc.AuthRoleGrantPermissionRequest(
            name="pdserve", perm=etcdrpc.Permission(permType=etcdrpc.Permission.READWRITE, key=b"/pdserve/",
                                                    range_end=b"/pdserve0")))
        await auth.UserAdd(etcdrpc.AuthUserAddRequest(name=user, password=password))
        await auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=user, role="pdserve"))
        await auth.AuthEnable(etcdrpc.AuthEnableRequest())
        await client.close()
    asyncio.run(setup())


def refused_at_start(repo: str, args: list[str]) -> str:
    """Starts pdserve expecting it to stop by itself, soon, with a reason; returns its log."""
    server = PdServer(repo, extra_args=args)
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="pdserve exited with 1") as info:
            server.start(timeout=60)
    finally:
        server.stop()
    assert time.monotonic() - began < 30, "a misconfigured etcd must fail fast, not hang"
    return str(info.value)


def test_shared_etcd_with_tls_client_certificates_and_users(repo, small_model, certs, tmp_path):
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd"), cert_file=certs["server.pem"], key_file=certs["server.key"],
                       client_ca_file=certs["ca.pem"]).start()   # TLS with --client-cert-auth
    try:
        tls = EtcdSecurity(cacert=certs["ca.pem"], cert=certs["client.pem"], key=certs["client.key"])
        etcd_auth_on(etcd.endpoint, tls, "pdserve", ETCD_PASSWORD)
        (tmp_path / "etcd.password").write_text(ETCD_PASSWORD + "\n")
        (tmp_path / "wrong.password").write_text("not-the-password\n")
        (tmp_path / "cluster.token").write_text("a-cluster-secret-of-32-characters")
        add_model(repo, "agg", small_model, config_text())
        shared = ["--etcd-endpoints", etcd.endpoint, "--cluster", "secure", "--cluster-token-file",
                  str(tmp_path / "cluster.token")]
        tls_flags = ["--etcd-cacert", certs["ca.pem"], "--etcd-cert", certs["client.pem"], "--etcd-key", certs["client.key"]]
        user_flags = ["--etcd-user", "pdserve", "--etcd-password-file", str(tmp_path / "etcd.password")]

        # without the flags pdserve cannot connect, and says which flag is missing
        assert "pass --etcd-cacert" in refused_at_start(repo, shared)
        assert "requires a client certificate" in refused_at_start(repo, shared + ["--etcd-cacert", certs["ca.pem"]])
        assert "pass --etcd-user and --etcd-password-file" in refused_at_start(repo, shared + tls_flags)
        wrong = ["--etcd-user", "pdserve", "--etcd-password-file", str(tmp_path / "wrong.password")]
        assert "etcd refused user 'pdserve'" in refused_at_start(repo, shared + tls_flags + wrong)

        # with them the front end and the engine use etcd: READY, serving, records signed in etcd
        server = PdServer(repo, extra_args=shared + tls_flags + user_flags).start()
        try:
            server.wait_ready("agg")
            assert generate_text(server.client).startswith("def f")
            user = EtcdSecurity(cacert=tls.cacert, cert=tls.cert, key=tls.key, user="pdserve",
                                password_file=str(tmp_path / "etcd.password"))
            records = [r for _, r, _ in etcd_records(etcd.endpoint, user)]
            assert [r["model"] for r in records] == ["agg"] and records[0]["signature"]
            with open(f"/proc/{records[0]['pid']}/cmdline", "rb") as f:
                engine_cmdline = f.read().decode()
            assert str(tmp_path / "etcd.password") in engine_cmdline and ETCD_PASSWORD not in engine_cmdline
        finally:
            server.stop()
    finally:
        etcd.cleanup()


def test_etcd_client_authenticates_again_when_its_token_expires(certs, tmp_path):
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd"), extra_args=("--auth-token-ttl", "1")).start()
    try:
        etcd_auth_on(etcd.endpoint, None, "pdserve", ETCD_PASSWORD)
        (tmp_path / "etcd.password").write_text(ETCD_PASSWORD)
        user = EtcdSecurity(user="pdserve", password_file=str(tmp_path / "etcd.password"))

        async def use():
            client = EtcdClient([etcd.endpoint], user)
            try:
                await client.put("/pdserve/t/a", b"1")
                first = client._token
                await asyncio.sleep(2.5)        # etcd forgets the token after 1 s unused
                await client.put("/pdserve/t/b", b"2")
                assert client._token and client._token != first
                with pytest.raises(EtcdRefused, match="lacks read/write permission"):
                    await client.put("/elsewhere", b"3")
                anonymous = EtcdClient([etcd.endpoint])
                with pytest.raises(EtcdRefused, match="pass --etcd-user"):
                    await anonymous.check("/pdserve/")
                await anonymous.close()
            finally:
                await client.close()
        asyncio.run(use())
    finally:
        etcd.cleanup()


def test_security_flags_are_checked_before_anything_starts(certs, tmp_path):
    with pytest.raises(SecurityConfigError, match="add --http-use-ssl"):
        server_ssl_context("http", False, False, certs["server.pem"], certs["server.key"], "")
    with pytest.raises(SecurityConfigError, match="--openai-use-ssl-mutual needs --openai-root-cert"):
        server_ssl_context("openai", False, True, certs["server.pem"], certs["server.key"], "")
    with pytest.raises(SecurityConfigError, match="cannot read the --http-server-key"):
        server_ssl_context("http", True, False, certs["server.pem"], str(tmp_path / "missing.key"), "")
    with pytest.raises(EtcdConfigError, match="--etcd-cert and --etcd-key go together"):
        EtcdSecurity(cacert=certs["ca.pem"], cert=certs["client.pem"]).check()
    with pytest.raises(EtcdConfigError, match="cannot read the --etcd-password-file"):
        EtcdSecurity(user="u", password_file=str(tmp_path / "none")).check()
    # (pdserve.cli is not imported here: its protos clash with tritonclient's in one process)
    cli = subprocess.run([sys.executable, "-m", "pdserve.cli", "--model-repository", str(tmp_path), "--etcd-cacert",
                          certs["ca.pem"]], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1 and "pass --etcd-endpoints too" in cli.stderr
    assert parse_endpoints("https://10.0.0.1:2379, 10.0.0.2:2379") == (["10.0.0.1:2379", "10.0.0.2:2379"], True)


# --- TLS on the HTTP doors -------------------------------------------------------------------------

def test_http_and_openai_doors_over_tls(repo, small_model, certs):
    add_model(repo, "agg", small_model, config_text())
    server = PdServer(repo, extra_args=[
        "--http-use-ssl", "--http-server-cert", certs["server.pem"], "--http-server-key", certs["server.key"],
        "--openai-use-ssl-mutual", "--openai-server-cert", certs["server.pem"], "--openai-server-key",
        certs["server.key"], "--openai-root-cert", certs["ca.pem"]]).start()
    try:
        server.wait_ready("agg")
        # KServe HTTP: tritonclient.http over https, trusting the CA
        https = httpclient.InferenceServerClient(server.http_url, ssl=True, ssl_options={"ca_certs": certs["ca.pem"]},
                                                 ssl_context_factory=gevent.ssl.create_default_context)
        assert https.is_server_ready()
        text = httpclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"def f"], dtype=object))
        params = httpclient.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([json.dumps(GREEDY).encode()], dtype=object))
        assert https.infer("agg", [text, params]).as_numpy("text_output")[0].decode().startswith("def f")
        https.close()
        plain = httpclient.InferenceServerClient(server.http_url, connection_timeout=5, network_timeout=5)
        with pytest.raises(Exception):
            plain.is_server_live()
        plain.close()

        # OpenAI: https with a client certificate of the CA; without one, or in clear text, refused
        base = f"https://127.0.0.1:{server.openai_port}/v1"
        body = json.dumps({"model": "agg", "prompt": "def f", "max_tokens": 4, "temperature": 0}).encode()
        mutual = ssl.create_default_context(cafile=certs["ca.pem"])
        mutual.load_cert_chain(certs["client.pem"], certs["client.key"])
        request = urllib.request.Request(f"{base}/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=mutual, timeout=60) as response:
            assert response.status == 200 and json.load(response)["choices"][0]["text"]
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"{base}/models", context=ssl.create_default_context(cafile=certs["ca.pem"]),
                                   timeout=10).read()
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{server.openai_port}/v1/models", timeout=10).read()
        assert server.client.is_server_ready()   # the gRPC door stays plaintext: each door has its own flags
    finally:
        server.stop()


# --- what the KV transport listens on --------------------------------------------------------------

def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc (no ss needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                (address, port), state, inode = fields[1].split(":"), fields[3], fields[9]
                if state != "0A" or inode not in inodes:      # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)                  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def test_engines_listen_only_on_the_advertise_host(repo, small_model):
    """Mooncake binds its handshake and data listeners to the wildcard address; engines start with
    engine/bind_host.c preloaded, so every listener of a PD engine is on the advertise host."""
    add_model(repo, "pd", small_model, config_text(role_groups=(("PREFILL", "cpu"), ("DECODE", "cpu"))))
    server = PdServer(repo).start()   # --advertise-host defaults to 127.0.0.1
    try:
        server.wait_ready("pd")
        text = server.client.infer("pd", inputs("def f", False, GREEDY)).as_numpy("text_output")[0].decode()
        assert text.startswith("def f") and len(text) > len("def f")   # a KV handoff over those ports
        records = [record for _, record, _ in etcd_records(server.etcd_endpoint)]
        assert sorted(r["role"] for r in records) == ["DECODE", "PREFILL"]
        for record in records:
            listeners = listening_sockets(record["pid"])
            ports = [port for _, port in listeners]
            # the engine RPC, Mooncake's handshake port and at least its data port
            assert int(record["address"].rsplit(":", 1)[1]) in ports, listeners
            assert len(listeners) >= 3, listeners
            assert all(address in ("127.0.0.1", "::ffff:127.0.0.1") for address, _ in listeners), listeners
    finally:
        server.stop()
