"""Look up a missing PATH once, then 100 times more, and print the server log's size just before the repeats.

The repeats come 0.3 s after the first lookup, in this one process, well within a metadata TTL of 1 s
(s3crypt's default). They name the file relative to its directory, the working directory, so that they measure
the missing name alone: a path through the directory would also revalidate the directory whenever its own
TTL ran out in between. Even a relative name makes the kernel check the working directory's search permission,
which asks the file system for the directory's attributes once they are older than the TTL; when the first
lookup is slow (a busy server), that falls among the repeats. So the directory is stat()ed just before the
offset is taken: what it costs is the directory's, counted before the repeats. The caller counts the server's
requests from the printed offset on.
"""
import os
import sys
import time


def main() -> None:
    path, log = sys.argv[1], os.path.abspath(sys.argv[2])
    os.chdir(os.path.dirname(path))
    name = os.path.basename(path)

    def probe() -> None:
        try:
            os.stat(name)
        except FileNotFoundError:
            pass

    probe()
    time.sleep(0.2)
    os.stat(".")
    time.sleep(0.1)
    print(os.path.getsize(log))
    for _ in range(100):
        probe()


if __name__ == "__main__":
    main()
