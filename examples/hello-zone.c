/* Counts its own runs in a zone that every run shares. cc hello-zone.c $(pkg-config --cflags --libs shmzone) */
#include <shmzone.h>
#include <stdio.h>

int main(void) {
        struct shmz_client *c;
        struct shmz_zone *z;

        if (shmz_connect(NULL, &c) < 0 || shmz_zone_open(c, "hello", 4096, "counter", SHMZ_CREATE, &z) < 0)
                return 1;
        unsigned long *runs = shmz_zone_base(z); /* a new zone's bytes are zero */
        int r = shmz_mutex_lock(shmz_zone_mutex(z));
        if (r == SHMZ_OWNER_DEAD) /* its last holder died holding it: nothing of ours to repair */
                shmz_mutex_consistent(shmz_zone_mutex(z));
        if (r >= 0) {
                printf("run %lu\n", ++*runs);
                shmz_mutex_unlock(shmz_zone_mutex(z));
        }
        shmz_zone_close(z);
        shmz_disconnect(c);
        return r < 0;
}
