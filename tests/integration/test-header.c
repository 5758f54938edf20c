/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Built with -std=c99 -pedantic -Werror: the public headers must need nothing else. */
#include <shmzone.h>
#include <shmzone-abi.h>

int main(void) {
        struct shmz_mutex m;
        struct shmz_zone_header h;

        return (sizeof(m) == SHMZ_MUTEX_SIZE && sizeof(h) == SHMZ_ZONE_HEADER_SIZE) ? 0 : 1;
}
