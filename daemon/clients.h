/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * Who is connected to the control socket: connections per uid, and the limits
 * that keep one user from taking every slot. Any thread; one mutex inside,
 * never held across a call out.
 */

#include <stdint.h>
#include <sys/types.h>

/* Slots only root may take once max_clients is reached, so an administrator always gets in. */
#define CLIENTS_ROOT_RESERVE 16u

struct clients;

int clients_new(struct clients **ret);
struct clients *clients_free(struct clients *cl);
/* From the config (main thread, at start and on reload). */
void clients_set_limits(struct clients *cl, unsigned max_clients, unsigned uid_max_clients,
                        uint64_t hello_timeout_usec);
/* Counts a new connection of uid: 0, or -EUSERS (all slots taken) / -EDQUOT (uid_max_clients reached). */
int clients_add(struct clients *cl, uid_t uid);
void clients_remove(struct clients *cl, uid_t uid);
unsigned clients_count(struct clients *cl);
/* How long a new connection may take to say hello. */
uint64_t clients_hello_timeout_usec(struct clients *cl);
