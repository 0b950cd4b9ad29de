"""Sans-I/O protocol cores.

Contract: bytes, events and `now` (monotonic seconds) go in; bytes, events and the next deadline
come out. Nothing here imports asyncio, socket, os, time, random, threading, pytun or pyroute2;
tests/test_architecture.py enforces it. Receive paths raise only RemoteProtocolError.
"""
