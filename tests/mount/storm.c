/* Process storms for the tracking tests, at a rate Python cannot make.
 *
 *   storm MODE N
 *
 * waits for a line on stdin (time for the test to move it into a cgroup), makes the storm, prints
 * "done" and the PIDs of what it left alive, then waits for stdin to close before it exits.
 *
 *   flat     fork N children one after another, each exits at once and is reaped
 *   exec     fork and exec /bin/true N times, each reaped
 *   wide     N children alive at once, then all released and reaped
 *   chain    a chain of N orphans: each forks the next and exits unreaped
 *   threads  N threads made and joined, 64 alive at a time
 *   daemons  N daemons (fork, setsid, fork, the middle one exits): they live until stdin closes
 *   vfork    (N ignored) vfork(): the child prints "done" and its PID, and exits at the next
 *            line on stdin; the parent, back from vfork(), spins until it is killed
 *   siblings N children made with clone(CLONE_PARENT), as runc starts a container: the
 *            storm's parent is theirs; they live until stdin closes
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static pid_t fork_or_die(void)
{
	pid_t pid = fork();

	if (pid < 0)
		die("fork");
	return pid;
}

static void reap(pid_t pid)
{
	if (waitpid(pid, NULL, 0) != pid)
		die("waitpid");
}

static void flat(long n, int exec_true)
{
	for (long i = 0; i < n; i++) {
		pid_t pid = fork_or_die();

		if (pid == 0) {
			if (exec_true)
				execl("/bin/true", "true", (char *)NULL);
			_exit(0);
		}
		reap(pid);
	}
}

static void wide(long n)
{
	int release[2];
	pid_t *pids = calloc(n, sizeof(*pids));
	char byte;

	if (!pids || pipe(release))
		die("wide");
	for (long i = 0; i < n; i++) {
		pids[i] = fork_or_die();
		if (pids[i] == 0) {
			close(release[1]);
			while (read(release[0], &byte, 1) < 0)
				;
			_exit(0);
		}
	}
	close(release[1]);
	for (long i = 0; i < n; i++)
		reap(pids[i]);
	free(pids);
}

static void chain(long n)
{
	int last[2];
	char byte = 0;
	pid_t first;

	if (pipe(last))
		die("pipe");
	first = fork_or_die();
	if (first == 0) {
		close(last[0]);
		for (long i = 1; i < n; i++)
			if (fork_or_die() > 0)
				_exit(0); /* the child goes on, an orphan */
		if (write(last[1], &byte, 1) != 1)
			_exit(2);
		_exit(0);
	}
	close(last[1]);
	if (read(last[0], &byte, 1) != 1)
		die("chain");
	close(last[0]);
	reap(first);
}

static void *nothing(void *arg)
{
	return arg;
}

static void threads(long n)
{
	pthread_t batch[64];

	for (long done = 0; done < n;) {
		int made = 0;

		for (; made < 64 && done + made < n; made++)
			if (pthread_create(&batch[made], NULL, nothing, NULL))
				die("pthread_create");
		for (int i = 0; i < made; i++)
			pthread_join(batch[i], NULL);
		done += made;
	}
}

/* Each daemon sends its PID up a pipe, then waits for stdin to close. */
static void daemons(long n)
{
	int report[2];

	if (pipe(report))
		die("pipe");
	for (long i = 0; i < n; i++) {
		pid_t middle = fork_or_die();

		if (middle == 0) {
			setsid();
			if (fork_or_die() == 0) {
				pid_t self = getpid();
				char byte;

				if (write(report[1], &self, sizeof(self)) != sizeof(self))
					_exit(2);
				close(report[1]);
				close(report[0]);
				while (read(0, &byte, 1) > 0)
					;
				_exit(0);
			}
			_exit(0);
		}
		reap(middle);
	}
	close(report[1]);
	printf("done");
	for (long i = 0; i < n; i++) {
		pid_t pid;

		if (read(report[0], &pid, sizeof(pid)) != sizeof(pid))
			die("daemons");
		printf(" %d", pid);
	}
	printf("\n");
	fflush(stdout);
}

/* The parent of these is the storm's; the kernel places them in the storm's cgroup. */
static void siblings(long n)
{
	printf("done");
	for (long i = 0; i < n; i++) {
		pid_t pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
		char byte;

		if (pid < 0)
			die("clone");
		if (pid == 0) {
			while (read(0, &byte, 1) > 0)
				;
			_exit(0);
		}
		printf(" %d", pid);
	}
	printf("\n");
	fflush(stdout);
}

/* The vfork() child may only make system calls: it writes with write(2). */
static void vforked(void)
{
	char line[64];
	int length;

	if (vfork() == 0) {
		length = snprintf(line, sizeof(line), "done %d\n", getpid());
		if (write(1, line, length) != length || read(0, line, 1) < 0)
			_exit(2);
		_exit(0);
	}
	for (;;)
		;
}

int main(int argc, char **argv)
{
	char line[64];
	long n;

	if (argc != 3 || (n = atol(argv[2])) <= 0) {
		fprintf(stderr, "usage: storm flat|exec|wide|chain|threads|daemons|vfork|siblings N\n");
		return 2;
	}
	if (!fgets(line, sizeof(line), stdin))
		return 2;
	if (!strcmp(argv[1], "flat"))
		flat(n, 0);
	else if (!strcmp(argv[1], "exec"))
		flat(n, 1);
	else if (!strcmp(argv[1], "wide"))
		wide(n);
	else if (!strcmp(argv[1], "chain"))
		chain(n);
	else if (!strcmp(argv[1], "threads"))
		threads(n);
	else if (!strcmp(argv[1], "daemons"))
		daemons(n);
	else if (!strcmp(argv[1], "vfork"))
		vforked();
	else if (!strcmp(argv[1], "siblings"))
		siblings(n);
	else
		return 2;
	if (strcmp(argv[1], "daemons") && strcmp(argv[1], "siblings")) {
		printf("done\n");
		fflush(stdout);
	}
	while (fgets(line, sizeof(line), stdin))
		;
	return 0;
}
