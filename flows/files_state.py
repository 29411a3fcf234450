"""A folder as state: a "framework" writes its files into a folder every epoch; the folder is
part of each checkpoint, and a retry after a SIGKILL finds it restored as it was at the save.

    python flows/files_state.py run                 # killed at epoch 3, resumes with the folder back
    python flows/files_state.py run --crash-at 0    # uninterrupted

`self.out = Directory("adapter")` makes the folder state: each save stores every file under
it (an unchanged file, such as the 4 MB base weights here, is stored once); load() writes the
files back to the same path before the step goes on, replacing what the killed attempt left.
"""
import hashlib
import os
import shutil
import signal

from metaflow import Directory, FlowSpec, Parameter, checkpoint, current, retry, step


def write_epoch(folder: str, epoch: int) -> None:
    """What a framework does each epoch: new adapter weights and a log line; the base stays."""
    base = os.path.join(folder, "base.bin")
    if not os.path.exists(base):
        with open(base, "wb") as f:
            f.write(hashlib.sha256(b"base").digest() * ((4 << 20) // 32))  # 4 MB, never changes
    with open(os.path.join(folder, "adapter.bin"), "wb") as f:
        f.write(hashlib.sha256(f"epoch {epoch}".encode()).digest() * 1024)
    with open(os.path.join(folder, "log.txt"), "a") as f:
        f.write(f"epoch {epoch}\n")


def digest_of(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


class FilesFlow(FlowSpec):
    epochs = Parameter("epochs", default=5)
    crash_at = Parameter("crash-at", default=3, help="Epoch at which attempt 0 is killed (0: never).")

    @retry(times=1, minutes_between_retries=0)
    @checkpoint
    @step
    def start(self):
        folder = f"adapter-{current.run_id}"
        if current.checkpoint.load():
            print(f"attempt {current.retry_count}: resumed at epoch {self.epoch}, {folder} restored")
            assert open(os.path.join(folder, "log.txt")).read().count("\n") == self.epoch
        else:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            self.epoch, self.out = 0, Directory(folder)
        while self.epoch < self.epochs:
            self.epoch += 1
            write_epoch(folder, self.epoch)
            current.checkpoint.save(step=self.epoch)
            if current.retry_count == 0 and self.epoch == self.crash_at:
                current.checkpoint.wait()  # the crash strikes once this epoch's save is durable
                with open(os.path.join(folder, "adapter.bin"), "wb") as f:
                    f.write(b"half-written by the killed attempt")
                print(f"attempt 0: killed at epoch {self.epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
        self.digest = digest_of(folder)
        shutil.rmtree(folder)
        self.next(self.end)

    @step
    def end(self):
        print(f"{self.epochs} epochs; the folder's digest {self.digest[:12]}; artifact {self.out!r}")


if __name__ == "__main__":
    FilesFlow()
