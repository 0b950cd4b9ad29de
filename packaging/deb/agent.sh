#!/bin/sh
# /usr/bin/agent: the agent from its private virtual environment in /usr/lib/agent.
# -I: ignore PYTHON* variables, the user's site-packages and the current directory;
# -B: write no bytecode (the package ships it), so nothing appears that dpkg does not own.
exec /usr/lib/agent/bin/python -I -B -m agent "$@"
