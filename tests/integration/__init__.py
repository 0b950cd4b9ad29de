"""Tests in network namespaces against real processes: our daemon and Debian's wireguard-go."""
