"""
The sandbox: model-generated code is untrusted, so it runs only here, in a child process, and the
verdict ("pass", "fail", "error" or "timeout") is decided on the trusted side.

    from sandbox import execute, execute_many
    execute("def f(x):\n    return x + 1\n", "assert f(1) == 2\n")   # 'pass'
"""
import contextlib
import marshal
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor


MEMORY_LIMIT = 512 * 2**20  # bytes of address space, roomy for Python's startup
OUTPUT_LIMIT = 256 * 2**10  # bytes the child may write to any file, its captured output included
NOBODY = 65534
EXEC_TIMEOUT = 3.0
# Runs in the child before the untrusted code. The success token comes in a file deleted at once,
# so it lives only in this process's memory, never in argv or the environment.
HARNESS = r'''
import _io, builtins, io, marshal, os, posix, resource, sys
with open(sys.argv[1], 'rb') as fh:
    program, tests, token, limits = marshal.load(fh)
os.remove(sys.argv[1])
write, exit_now = os.write, os._exit  # the harness keeps these; the guard takes them from the program
import collections, functools, itertools, math, re, string  # what a program may import in the chroot
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
if os.getuid() == 0:  # lock the program in the scratch dir as nobody (RLIMIT_NPROC does not bind root)
    try:
        os.chroot('.'); os.setgroups([]); os.setgid(65534); os.setuid(65534)
    except OSError:  # not permitted here: only the guard below stops forks and writes
        pass
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new processes (nor threads)
def blocked(*args, **kwargs):
    raise PermissionError('blocked by the sandbox')
for name in ('fork forkpty system popen execv execve spawnv spawnve posix_spawn posix_spawnp kill killpg abort '
             '_exit remove unlink rmdir removedirs rename renames replace truncate chmod chown lchown link '
             'symlink mkfifo mknod putenv unsetenv setuid setgid setsid chdir chroot open').split():
    setattr(os, name, blocked); setattr(posix, name, blocked)  # os re-exports posix's functions
for name in ('subprocess', 'multiprocessing', '_posixsubprocess', 'ctypes', '_ctypes', 'socket', '_socket'):
    sys.modules[name] = None  # importing it now raises ImportError
real_open = builtins.open
def read_only_open(file, mode='r', *args, **kwargs):
    if set(mode) & set('wax+'):
        raise PermissionError('writing files is blocked by the sandbox')
    return real_open(file, mode, *args, **kwargs)
builtins.open = io.open = _io.open = read_only_open
namespace, status = {'__name__': '__main__'}, 'error'
try:
    exec(compile(program, '<program>', 'exec'), namespace)
    try:
        exec(compile(tests, '<tests>', 'exec'), namespace)
        status = 'pass'
    except AssertionError:
        status = 'fail'
except BaseException:  # errors, SystemExit, KeyboardInterrupt: the tests did not run through
    pass
write(1, f'\n{token} {status}\n'.encode())
exit_now(0)  # skip any atexit handlers and finalizers the program left
'''


def execute(program, tests, timeout=EXEC_TIMEOUT):
    """Run program then tests in a sandboxed child: "pass"; "fail" (an assert failed); "error" (syntax
    or runtime error, or the program exited or was killed before the tests reported); "timeout" (wall
    clock or CPU time). Only a line with this run's random token, written by the harness after the
    tests, reports pass or fail, so printing "pass" or exiting early does not fake one."""
    scratch, token = tempfile.mkdtemp(prefix='sandbox-'), secrets.token_hex(16)
    try:
        job = os.path.join(scratch, 'job')
        limits = {'RLIMIT_CPU': math.ceil(timeout) + 1, 'RLIMIT_AS': MEMORY_LIMIT, 'RLIMIT_FSIZE': OUTPUT_LIMIT,
                  'RLIMIT_CORE': 0}
        with open(job, 'wb') as fh:
            marshal.dump((program, tests, token, limits), fh)
        if os.getuid() == 0:
            os.chown(scratch, NOBODY, NOBODY)  # the child works here as nobody
        with tempfile.TemporaryFile() as out:  # unnamed: only the child's stdout and stderr reach it
            proc = subprocess.Popen([sys.executable, '-I', '-S', '-c', HARNESS, job], cwd=scratch, env={},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:  # the whole process group, should anything have escaped the fork block
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.seek(0)
            output = out.read()  # at most OUTPUT_LIMIT bytes
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU):  # our kill at the wall-clock limit, or RLIMIT_CPU
        return 'timeout'
    return next((s for s in ('pass', 'fail') if f'\n{token} {s}\n'.encode() in output), 'error')


def execute_many(jobs, timeout=EXEC_TIMEOUT, workers=None):
    """execute() over (program, tests) pairs in parallel; results in input order."""
    # a run mostly waits (process start-up, polling for its exit), so by default 4 per core
    with ThreadPoolExecutor(workers or 4 * os.cpu_count()) as pool:
        return list(pool.map(lambda job: execute(*job, timeout), jobs))
