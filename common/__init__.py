"""Small helpers with no FaceLab dependencies, shared by ``models``, ``storage`` and
``pipeline`` (which must not import each other): atomic file writes, box overlap and a
hardened XML parser."""
