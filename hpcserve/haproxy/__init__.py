"""HAProxy: the config (config), the process (process) and its sockets (runtime)."""
