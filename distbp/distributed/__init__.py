"""Everything that imports Ray: connecting, the session that places and tears down a run's
actors, the transport of a step's vectors, the actors, the servers and the crew."""
