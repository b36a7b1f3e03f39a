"""NBD (network block device): a client that serves as a remote host file for any format
driver (``nbd://``, ``nbds://``, ``nbd+unix://``, ``nbds+unix://`` URLs, registered with
:mod:`imgfs.remote` by :mod:`imgfs.remote.nbd`), and ``imgfs serve``, a server exporting every
disk of an images directory (:mod:`imgfs.nbd.server`). :mod:`imgfs.nbd.protocol` holds the wire
format both use."""

from __future__ import annotations

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
