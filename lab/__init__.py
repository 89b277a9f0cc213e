"""LanHub's test lab: throwaway servers and players on this machine, for the tests, `manage.py lab` and benchmarks.

- ``lab.netns``: network-namespace hosts (one kernel, no systemd): fast nodes with their own sshd, and players.

Test infrastructure, not part of the portal: nothing under lanhub/, nodes/ or players/ imports it except the
`manage.py lab` command. Run as root.
"""
