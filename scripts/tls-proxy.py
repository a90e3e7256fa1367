#!/usr/bin/env python3
"""TLS-terminating TCP proxy for tests (the TLS settings of the S3 client need an https endpoint,
and Garage speaks plain HTTP).

    scripts/tls-proxy.py DIR LISTEN_PORT UPSTREAM_PORT

Creates a throwaway CA and a server certificate for 127.0.0.1 in DIR (ca.pem is the CA to trust),
then accepts TLS on 127.0.0.1:LISTEN_PORT and forwards the plaintext to 127.0.0.1:UPSTREAM_PORT.
Runs until killed; writes its pid to DIR/tls-proxy.pid.
"""
import asyncio
import os
import ssl
import subprocess
import sys


def make_certificates(directory):
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca_pem = f"{directory}/ca.key", f"{directory}/ca.pem"
    key, csr, pem = f"{directory}/server.key", f"{directory}/server.csr", f"{directory}/server.pem"
    ext = f"{directory}/server.ext"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_pem,
            "-days", "2", "-subj", "/CN=ferry test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key, "-CAcreateserial",
            "-out", pem, "-days", "2", "-extfile", ext)
    return pem, key


async def pipe(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main(directory, listen_port, upstream_port):
    pem, key = make_certificates(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem, key)

    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, ssl=context)
    with open(f"{directory}/tls-proxy.pid", "w") as f:
        f.write(str(os.getpid()))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    directory, listen_port, upstream_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    asyncio.run(main(directory, listen_port, upstream_port))
