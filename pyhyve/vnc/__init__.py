"""The VNC console of a display: the RFB server (server.py) and its parts."""
