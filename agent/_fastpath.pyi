# Types of the compiled module built from native/ (see native/fastpath.h); the Python twins
# with the same signatures are named in each function's docstring.
from collections.abc import Sequence

_Buffer = bytes | bytearray | memoryview

class Aead:
    def __init__(self, key: bytes) -> None: ...
    def encrypt(self, nonce: bytes, data: _Buffer, associated_data: _Buffer | None) -> bytes: ...
    def decrypt(self, nonce: bytes, data: _Buffer, associated_data: _Buffer | None) -> bytes: ...

class ReplayWindow:
    def accept(self, counter: int) -> bool: ...

def seal(
    aead: Aead, remote_index: int, counter: int, packets: Sequence[_Buffer]
) -> list[bytes]: ...
def open_run(
    aead: Aead, replay: ReplayWindow, datagrams: Sequence[_Buffer], start: int, index: int
) -> tuple[int, list[bytes], list[bytes], int, int, int, int, int, bool]: ...
