"""Look up a missing PATH once, then 100 times more, and print the server log's size just before the repeats.

The repeats come 0.2 s after the first lookup, in this one process, well within a metadata TTL of 1 s
(s3crypt's default). They name the file relative to its directory, the working directory, so that they measure
the missing name alone: a path through the directory would also revalidate the directory whenever its own
TTL ran out in between. The caller counts the server's requests from the printed offset on.
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
    print(os.path.getsize(log))
    for _ in range(100):
        probe()


if __name__ == "__main__":
    main()
