"""Checks node-agent's SPIFFE Workload API with py-spiffe (PyPI `spiffe`).

Run by tests/local/workload_api.rs. Each mode prints one JSON object on its last
line and exits 0 when every check passed; a failed check raises (exit 1).

  check.py svid SOCKET SPIFFE_ID SERIALS TIMEOUT
      WorkloadApiClient: fetch_x509_svid, fetch_x509_bundles, the JWT-SVID
      methods; then X509Source until SERIALS distinct leaf serials were seen.
  check.py no-header SOCKET
      py-spiffe's own generated stub on a channel without its header.
  check.py denied SOCKET
      WorkloadApiClient against an agent without WORKLOAD_TOKEN_PATH.
  check.py bundles SOCKET
      Every trust domain's authorities (SHA-256 of each DER, sorted), as
      fetch_x509_bundles and as fetch_x509_context (FetchX509SVID's bundle
      and federated bundles) give them.
"""

import hashlib
import json
import sys
import threading
import time

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.spiffe_id.spiffe_id import TrustDomain


def public_der(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_svid(svid, bundle_set, spiffe_id):
    """The SVID names spiffe_id, its key matches its leaf, and its chain
    verifies up to an authority of its trust domain's bundle."""
    assert str(svid.spiffe_id) == spiffe_id, (str(svid.spiffe_id), spiffe_id)
    assert public_der(svid.private_key.public_key()) == public_der(svid.leaf.public_key())
    bundle = bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None, "no bundle for the SVID's trust domain"
    chain = svid.cert_chain
    for cert, issuer in zip(chain, chain[1:]):
        cert.verify_directly_issued_by(issuer)
    last = chain[-1]
    verified = []
    for root in bundle.x509_authorities:
        try:
            last.verify_directly_issued_by(root)
            verified.append(root)
        except Exception:
            pass
    assert verified, "the chain does not verify against the bundle"
    root = verified[0]
    root.verify_directly_issued_by(root)  # a self-signed root
    return format(svid.leaf.serial_number, "x")


def svid(socket, spiffe_id, serials, timeout):
    out = {}
    with WorkloadApiClient(socket_path="unix://" + socket) as client:
        s = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        out["first_serial"] = verify_svid(s, bundles, spiffe_id)
        td = TrustDomain(spiffe_id.split("/")[2])
        b = bundles.get_bundle_for_trust_domain(td)
        out["bundle_authorities"] = len(b.x509_authorities)
        ctx = client.fetch_x509_context()
        assert ctx.default_svid.leaf.serial_number == s.leaf.serial_number
        for name, call in [
            ("fetch_jwt_svid", lambda: client.fetch_jwt_svid(audience={"a"})),
            ("fetch_jwt_bundles", client.fetch_jwt_bundles),
        ]:
            try:
                call()
                raise AssertionError(name + " succeeded")
            except AssertionError:
                raise
            except Exception as e:  # py-spiffe wraps the gRPC error
                assert "UNIMPLEMENTED" in str(e) and "X.509" in str(e), str(e)
                out[name] = str(e)

    seen = []
    changed = threading.Event()
    with X509Source(socket_path="unix://" + socket, timeout_in_seconds=timeout) as source:
        def note():
            ctx = source.get_x509_context()
            serial = verify_svid(ctx.default_svid, ctx.x509_bundle_set, spiffe_id)
            if serial not in seen:
                seen.append(serial)
            if len(seen) >= serials:
                changed.set()
        source.subscribe_for_updates(note)
        note()
        assert changed.wait(timeout), "X509Source saw only %s" % seen
    out["serials"] = seen
    return out


def no_header(socket):
    channel = grpc.insecure_channel("unix:" + socket)
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    try:
        next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10))
        raise AssertionError("FetchX509SVID without the header succeeded")
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details()}
    finally:
        channel.close()


def denied(socket):
    with WorkloadApiClient(socket_path="unix://" + socket) as client:
        try:
            client.fetch_x509_svid()
            raise AssertionError("fetch_x509_svid without a token file succeeded")
        except AssertionError:
            raise
        except Exception as e:
            return {"error": str(e)}


def authorities(bundle_set):
    out = {}
    for bundle in bundle_set.bundles:
        out[bundle.trust_domain.name] = sorted(
            hashlib.sha256(a.public_bytes(serialization.Encoding.DER)).hexdigest()
            for a in bundle.x509_authorities
        )
    return out


def bundles(socket):
    with WorkloadApiClient(socket_path="unix://" + socket) as client:
        return {
            "fetch_x509_bundles": authorities(client.fetch_x509_bundles()),
            "fetch_x509_svid": authorities(client.fetch_x509_context().x509_bundle_set),
        }


def main():
    mode, socket = sys.argv[1], sys.argv[2]
    if mode == "svid":
        result = svid(socket, sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    elif mode == "no-header":
        result = no_header(socket)
    elif mode == "denied":
        result = denied(socket)
    elif mode == "bundles":
        result = bundles(socket)
    else:
        raise SystemExit("unknown mode " + mode)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
