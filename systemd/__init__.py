"""systemd unit files for anyad (installed as ``anyad.systemd``; written out by ``anyad install-service``)."""
