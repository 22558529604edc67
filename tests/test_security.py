"""TLS, mutual TLS and restricted protocols on the KServe gRPC port, as Triton's flags do them,
checked with tritonclient against a real server."""
import subprocess

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from harness import PdServer, add_model, config_text, inputs

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
