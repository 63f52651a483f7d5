"""The worker reads the frontend's messages ahead (handlers/read_ahead.py): TorchServe's own parser, on a real
socket, must see exactly the stream it would see reading one field at a time."""

import random
import socket
import struct
import threading

import pytest
from ts.protocol import otf_message_handler

from handlers import read_ahead

TORCHSERVE_READ = otf_message_handler._retrieve_buffer


def field(value: bytes) -> bytes:
    return struct.pack("!i", len(value)) + value


END = struct.pack("!i", -1)


def predict_message(bodies: list[bytes]) -> bytes:
    """An inference message as TorchServe 0.12's frontend encodes it: per request an id, headers, parameters."""
    message = b"I"
    for index, body in enumerate(bodies):
        message += field(b"%036d" % index)
        for name, value in ((b"Content-Type", b"application/octet-stream"), (b"Authorization", b"Bearer k")):
            message += field(name) + field(value)
        message += END + field(b"body") + field(b"application/octet-stream") + field(body) + END
    return message + END


def send_in_pieces(sock: socket.socket, data: bytes, seed: int = 0) -> threading.Thread:
    """Write `data` in random-sized pieces from another thread, as a busy frontend's writes arrive."""
    pieces = random.Random(seed)

    def write() -> None:
        offset = 0
        while offset < len(data):
            size = pieces.choice((1, 3, 4, 17, 4096, 65536, 300_000))
            sock.sendall(data[offset:offset + size])
            offset += size

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def torchserve_reads(monkeypatch):
    """Whatever a test installs is taken back afterwards."""
    monkeypatch.setattr(otf_message_handler, "_retrieve_buffer", TORCHSERVE_READ)


def parse_all(message: bytes, count: int) -> list:
    reader_end, writer_end = socket.socketpair()
    reader_end.settimeout(30)  # a lost byte fails the test instead of hanging it
    with reader_end, writer_end:
        writer = send_in_pieces(writer_end, message * count)
        parsed = [otf_message_handler.retrieve_msg(reader_end) for _ in range(count)]
        writer.join()
    return parsed


def test_torchserve_s_parser_reads_the_same_messages_through_the_buffer(torchserve_reads, monkeypatch):
    monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", "false")
    # small bodies share the buffer; a body larger than it is read into its own
    bodies = [bytes([i]) * n for i, n in enumerate((0, 1, 15_000, read_ahead.BUFFER_BYTES + 7, 600_000, 5))]
    message = predict_message(bodies)
    expected = parse_all(message, 3)
    assert read_ahead.install()
    got = parse_all(message, 3)
    assert got == expected
    assert [p["value"] for p in got[2][1][0]["parameters"]] == [bodies[0]]
    assert [bytes(request["parameters"][0]["value"]) for request in got[1][1]] == bodies
    assert all(isinstance(request["requestId"], bytearray) for _, requests in got for request in requests)


def test_a_read_returns_what_was_asked_and_keeps_the_rest(torchserve_reads):
    reader_end, writer_end = socket.socketpair()
    with reader_end, writer_end:
        writer_end.sendall(b"abcdefgh")
        reader = read_ahead.SocketReader(reader_end, size=4)
        assert reader.read(0) == bytearray()
        assert reader.read(3) == bytearray(b"abc")
        assert reader.read(4) == bytearray(b"defg")  # 1 byte left in the buffer, 3 from the socket
        assert reader.read(1) == bytearray(b"h")


def test_readable_says_whether_a_read_would_return_at_once():
    reader_end, writer_end = socket.socketpair()
    with reader_end, writer_end:
        reader = read_ahead.SocketReader(reader_end)
        assert not reader.readable()
        writer_end.sendall(b"xyz")
        assert reader.readable()
        assert reader.read(1) == bytearray(b"x")
        assert reader.readable()  # the rest came in with that read and waits in the buffer
        assert reader.read(2) == bytearray(b"yz")
        assert not reader.readable()


def test_the_frontend_hanging_up_exits_the_worker_as_torchserve_s_reader_does():
    reader_end, writer_end = socket.socketpair()
    with reader_end:
        writer_end.sendall(b"ab")
        writer_end.close()
        reader = read_ahead.SocketReader(reader_end)
        with pytest.raises(SystemExit) as exited:
            reader.read(3)
        assert exited.value.code == 0


def test_install_puts_one_reader_per_socket_in_torchserve_s_protocol(torchserve_reads):
    assert read_ahead.install() and read_ahead.install()
    assert otf_message_handler._retrieve_buffer is read_ahead._retrieve_buffer
    reader_end, writer_end = socket.socketpair()
    with reader_end, writer_end:
        assert read_ahead.reader_for(reader_end) is read_ahead.reader_for(reader_end)


def test_a_socket_s_reader_goes_with_it():
    reader_end, writer_end = socket.socketpair()
    read_ahead.reader_for(reader_end)
    count = len(read_ahead._readers)
    reader_end.close()
    writer_end.close()
    del reader_end
    assert len(read_ahead._readers) == count - 1
