"""Pictures and numbers of a trained adapter: router specialisation by task, parameter scaling
and rank spectra (``analyze``, drawn by ``plots``), and routing statistics measured during
training (``routing_stats``)."""
