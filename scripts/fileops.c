/*
 * The C client of scripts/bench.py's file operations: Python's own client adds tens of
 * microseconds to every operation, which blurs the ratios between the file systems measured.
 *
 *	fileops COUNT WARMUP read PATH                  open, read 4096 bytes, close
 *	fileops COUNT WARMUP write PATH DATA PATH DATA  open, write DATA, close; alternating
 *	fileops COUNT WARMUP mkdir PATH                 mkdir, rmdir
 *
 * After WARMUP operations untimed, and one more (a new process's first also faults in its
 * code and data: three times the cost of the next), times COUNT one by one and prints each in
 * nanoseconds, a line each: the benchmark runs it in batches, taking turns with the other
 * targets, and merges the batches' samples before it takes their median and p99.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char **args; /* the operation's paths, and data to write */

static long long now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int read_once(long i)
{
	char buf[4096];
	int fd = open(args[0], O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf));
	close(fd);
	return n < 0 ? -1 : 0;
}

/*
 * Alternates between the two: writing a limit a file already holds, or moving a process to
 * the cgroup it is in, could cost less.
 */
static int write_once(long i)
{
	const char *path = args[i % 2 * 2], *data = args[i % 2 * 2 + 1];
	int fd = open(path, O_WRONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, data, strlen(data));
	close(fd);
	return n < 0 ? -1 : 0;
}

static int mkdir_once(long i)
{
	return mkdir(args[0], 0777) || rmdir(args[0]) ? -1 : 0;
}

int main(int argc, char **argv)
{
	int (*operate)(long) = NULL;
	long count, warmup;
	long long *samples;

	if (argc == 5 && !strcmp(argv[3], "read"))
		operate = read_once;
	else if (argc == 8 && !strcmp(argv[3], "write"))
		operate = write_once;
	else if (argc == 5 && !strcmp(argv[3], "mkdir"))
		operate = mkdir_once;
	if (!operate) {
		fprintf(stderr, "usage: fileops COUNT WARMUP read|write|mkdir PATH [DATA PATH DATA]\n");
		return 2;
	}
	count = atol(argv[1]);
	warmup = atol(argv[2]) + 1; /* and one more: see above */
	args = argv + 4;
	samples = malloc(count * sizeof(*samples));
	if (!samples)
		return 1;
	for (long i = 0; i < warmup + count; i++) {
		long long start = now();

		if (operate(i)) {
			perror(argv[3]);
			return 1;
		}
		if (i >= warmup)
			samples[i - warmup] = now() - start;
	}
	for (long i = 0; i < count; i++)
		printf("%lld\n", samples[i]);
	return 0;
}
